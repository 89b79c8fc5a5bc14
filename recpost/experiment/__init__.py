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
:mod:`.tracking` holds the W&B parts. A config with ``worlds:`` is a regime map (:mod:`.regimes`): the
same study once per simulated world, each in its own folder, then :mod:`.regime_report` across worlds.
"""

from __future__ import annotations

from pathlib import Path

from recpost.data import RecDataModule
from recpost.core.errors import RecpostError
from recpost.experiment.plan import Plan, Stage, build_plan
from recpost.experiment.regime_report import write_regime_results
from recpost.experiment.regimes import RegimeMap, World, is_regime_map, load_regime_map, write_world_config
from recpost.experiment.report import Report, write_results
from recpost.experiment.runner import (Runner, best_validation, check_output_dir, claim_output_dir, lock_output_dir,
                                       lock_plan)
from recpost.experiment.stats import paired_bootstrap
from recpost.experiment.study import DEFAULT_CONFIG, JudgeSpec, MethodSpec, RewardModelSpec, Study, load_study
from recpost.experiment.tracking import log_results, wandb_mode

__all__ = ["DEFAULT_CONFIG", "JudgeSpec", "MethodSpec", "Plan", "RegimeMap", "RewardModelSpec", "Runner", "Stage", "Study",
           "World", "best_validation", "build_plan", "experiment", "load_regime_map", "load_study", "paired_bootstrap",
           "run_plan", "run_regime_map", "wandb_mode", "write_regime_results", "write_results"]


def experiment(config: str = DEFAULT_CONFIG, output_dir: str | None = None, seeds: int | None = None,
               dry_run: bool = False, quick: bool = False, only_seed: int | None = None,
               methods: list[str] | None = None) -> Path:
    """Run the whole study of an experiment config and write its results tables and figures.

    A config with a ``worlds:`` section (a regime map, e.g. ``configs/experiments/sim_regimes.yaml``) runs the
    study once per simulated world, each in ``<output_dir>/<world>/``, then writes ``regimes.md``.

    Args:
        config: experiment YAML: a path, or a shipped config's name (``experiments/<name>.yaml``, ``recpost
            configs`` lists them); the default is the simulator study, from any folder.
        output_dir: where stages and results go (default ``runs/experiments/<name>``, with ``--quick``
            ``runs/experiments/<name>_quick``).
        seeds: number of seeds (0..N-1); overrides the config's ``seeds`` (and its ``quick:`` section's).
        dry_run: print every stage with its commands (``--dry-run``) and run nothing.
        quick: the config's ``quick:`` scale-down (``--quick``): fewer seeds, epochs, grid points and judges,
            every method and stage kept (a regime map: fewer worlds too).
        only_seed: run the stages of this seed alone (one of 0..seeds-1), so that the seeds of a long study run
            side by side, one process or machine each, into the same ``output_dir`` (a shared file system);
            its tables go to ``<output_dir>/seed<N>/results.md``. The same command without ``--only_seed``
            then reuses every finished stage and writes the study's tables over all seeds.
        methods: run these methods' stages alone (``--methods '[sft, dpo]'``), with the stages they need (the
            base model, reward models, judges); the tables then cover these methods. Folders and stages are the
            whole study's, so the command without ``--methods`` reuses every finished stage.
    """
    if is_regime_map(config):
        if only_seed is not None or methods is not None:
            raise RecpostError(f"{config} is a regime map; --only_seed and --methods take a single study's config")
        return run_regime_map(config, output_dir, seeds, dry_run, quick)
    study = load_study(config, quick=quick)  # every stage's settings checked: a bad grid value stops here
    plan = build_plan(study, Path(output_dir or f"runs/experiments/{study.name}"), seeds, only_seed, methods)
    check_output_dir(plan)
    if dry_run:
        print(plan.describe(), flush=True)
        return plan.out
    run_plan(plan)
    print(f"results: {plan.results_dir / 'results.md'}", flush=True)
    return plan.out


def run_regime_map(config: str, output_dir: str | None = None, seeds: int | None = None, dry_run: bool = False,
                   quick: bool = False) -> Path:
    """The study of a regime map in each of its worlds, one after the other, then the table across worlds
    (rewritten after each world, so a long map shows its finished worlds)."""
    regimes = load_regime_map(config, quick=quick)  # every world and every stage checked before anything runs
    out = Path(output_dir or f"runs/experiments/{regimes.name}")
    plans = regimes.plans(out, seeds)
    for plan in plans:
        check_output_dir(plan)
    if dry_run:
        print(regimes.describe(plans), flush=True)
        return out
    for world, plan in zip(regimes.worlds, plans):
        print(f"=== world {world.name} ({world.label}) into {plan.out}", flush=True)
        with lock_output_dir(plan.out):  # the world's settings change only while no other runner uses its folder
            write_world_config(plan.study, world)
        run_plan(plan)
        write_regime_results(regimes, out)
    print(f"results: {out / 'regimes.md'}", flush=True)
    return out


def run_plan(plan: Plan) -> None:
    """Run every stage of ``plan`` (finished ones reused) and write its results tables and figures."""
    study = plan.study
    with lock_plan(plan):
        claim_output_dir(plan)
        # The data every stage reads, checked and cached once, before the first stage: a bad file, column or
        # cache folder stops here with one line.
        RecDataModule.from_configs(study.base_configs).prepare_data()
        report = Report(plan)
        with Runner(plan) as runner:
            for stage, result in runner.run():
                report.add(stage, result)
                if stage.name not in runner.reused:  # the tables after each stage that ran (and at the end):
                    report.write()  # rewriting them after each of a resumed study's reused stages took minutes
            report.finish()
            if runner.wandb is not None:
                log_results(runner.wandb, runner.wandb_mode, study.name, plan.results_dir, runner.say)
