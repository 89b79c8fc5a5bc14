"""``recpost experiment``: the whole study in one command.

Per seed: pretrain (or reuse a given checkpoint) -> reward model (and, optionally, a second one,
trained independently, as an evaluator; more seeds for a reward ensemble; K judges trained on other
seeds and bootstrap resamples of the users) -> every post-training method over its grid -> test (and,
with ``eval_min_rating``, a second test over every target). Every stage is a normal ``recpost fit`` /
``recpost test`` run in its own folder under the output directory, with the exact commands in
``stage.json``, so any row can be re-run alone.

The steps, one module each: :mod:`.study` reads and checks the config (each stage's settings through
its method class: :mod:`.settings`), :mod:`.plan` turns it into stages and their command lines,
:mod:`.runner` runs them (reusing finished ones), :mod:`.report` writes the tables and figures;
:mod:`.tracking` holds the W&B parts.
"""

from __future__ import annotations

from pathlib import Path

from recpost.experiment.plan import Plan, Stage, build_plan
from recpost.experiment.report import Report, write_results
from recpost.data import RecDataModule
from recpost.experiment.runner import Runner, best_validation, check_output_dir, claim_output_dir, lock_output_dir
from recpost.experiment.stats import paired_bootstrap
from recpost.experiment.study import DEFAULT_CONFIG, JudgeSpec, MethodSpec, RewardModelSpec, Study, load_study
from recpost.experiment.tracking import log_results, wandb_mode

__all__ = ["DEFAULT_CONFIG", "JudgeSpec", "MethodSpec", "Plan", "RewardModelSpec", "Runner", "Stage", "Study", "best_validation",
           "build_plan", "experiment", "load_study", "paired_bootstrap", "wandb_mode", "write_results"]


def experiment(config: str = DEFAULT_CONFIG, output_dir: str | None = None, seeds: int | None = None,
               dry_run: bool = False, quick: bool = False) -> Path:
    """Run the whole study of an experiment config and write its results tables and figures.

    Args:
        config: experiment YAML (``configs/experiments/<name>.yaml``).
        output_dir: where stages and results go (default ``runs/experiments/<name>``, with ``--quick``
            ``runs/experiments/<name>_quick``).
        seeds: number of seeds (0..N-1); overrides the config's ``seeds`` (and its ``quick:`` section's).
        dry_run: print every stage with its commands (``--dry-run``) and run nothing.
        quick: the config's ``quick:`` scale-down (``--quick``): fewer seeds, epochs, grid points and judges,
            every method and stage kept.
    """
    study = load_study(config, quick=quick)  # every stage's settings checked: a bad grid value stops here
    plan = build_plan(study, Path(output_dir or f"runs/experiments/{study.name}"), seeds)
    check_output_dir(plan)
    if dry_run:
        print(plan.describe(), flush=True)
        return plan.out
    with lock_output_dir(plan.out):
        claim_output_dir(plan)
        # The data every stage reads, checked and cached once, before the first stage: a bad file, column or
        # cache folder stops here with one line.
        RecDataModule.from_configs(study.base_configs).prepare_data()
        report = Report(plan)
        with Runner(plan) as runner:
            for stage, result in runner.run():
                report.add(stage, result)
                report.write()
            report.finish()
            if runner.wandb is not None:
                log_results(runner.wandb, runner.wandb_mode, study.name, plan.out, runner.say)
    print(f"results: {plan.out / 'results.md'}", flush=True)
    return plan.out
