"""The study as a list of stages, built once: every ``recpost`` command line of an experiment comes from here.

Per seed, in the order of the result rows: the reward model, the evaluator reward model, the other
members of a reward ensemble (continued from the base checkpoint) and the judges (of their kinds:
``recpost.experiment.judging``), the base model
(pretrained here unless the study lists checkpoints), then every method over its grid. An argument that
names earlier stages' checkpoints is a :class:`CheckpointOf` (one) or :class:`CheckpointsOf` (a list)
placeholder, filled in by the runner once those stages have been fitted. The runner fits a needed stage
before the stage that needs it, so the base model is fitted first although its row comes after the
reward models: its test waits for the evaluator RM and the judges that score it.

Every reward model of a seed has its own training seed (:func:`role_seed`) and, but for the study's RM,
its own bootstrap resample of the users (seeded by that seed): the evaluator, the judges and the ensemble's
other members err on other users than the RMs a method trains against and than each other. Every policy's
test also names the study's RM as ``judge_reference``: the judges' agreement with it is measured there.

``recpost experiment --dry-run`` prints :meth:`Plan.describe`; the runner executes the same stages.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from recpost.core.errors import RecpostError
from recpost.experiment.judging import judge_configs
from recpost.experiment.study import MethodSpec, Study
from recpost.experiment.roles import ensemble_overrides, evaluator_overrides, judge_overrides, role_seed
from recpost.experiment.trials import describe_trials
from recpost.core.runs import BEST_CHECKPOINT

DEFAULT_MONITOR = ("val/ndcg@10", "max")  # what the pretrain and method configs select on already
ALL_TARGETS = "--data.eval_min_rating=null"  # the second test of a study with eval_min_rating: every target


@dataclass(frozen=True)
class CheckpointOf:
    """``<flag> <best checkpoint of the stage named stage>``: known once that stage has been fitted.

    ``required``: without that checkpoint the stage cannot run and is recorded as failed. Otherwise
    the flag is left out (the evaluator RM only adds a test column; DPO on logged pairs only reports
    the training RM's score).
    """

    flag: str
    stage: str
    required: bool = True

    def __str__(self) -> str:
        shown = f"{self.flag} <{BEST_CHECKPOINT}.ckpt of {self.stage}>"
        return shown if self.required else f"[{shown}]"


    @property
    def stages(self) -> tuple[str, ...]:
        return (self.stage,)


@dataclass(frozen=True)
class CheckpointsOf:
    """``<flag> [<best checkpoint of each stage in stages>]`` (a YAML list, as ``reward_ensemble`` and
    ``judges`` take it): known once those stages have been fitted.

    ``required``: every one of them must have its checkpoint, or the stage is recorded as failed (a reward
    ensemble). Otherwise the stages without one are left out of the list, and the flag too if none is left
    (judges: a failed judge only leaves the others).
    """

    flag: str
    stages: tuple[str, ...]
    required: bool = True

    def __str__(self) -> str:
        shown = f"{self.flag} [{', '.join(f'<{BEST_CHECKPOINT}.ckpt of {s}>' for s in self.stages)}]"
        return shown if self.required else f"[{shown}]"


Arg = str | CheckpointOf | CheckpointsOf
Placeholder = (CheckpointOf, CheckpointsOf)


def resolve(args: Sequence[Arg], checkpoints: Mapping[str, str | None]) -> list[str]:
    """``args`` with each placeholder replaced by its flag and the checkpoints of its stages; an optional
    placeholder's stages without a checkpoint are left out (the flag too, if none has one). A required one
    must have all its checkpoints."""
    out: list[str] = []
    for arg in args:
        if isinstance(arg, str):
            out.append(arg)
            continue
        found = [str(checkpoints[s]) for s in arg.stages if checkpoints.get(s)]
        if arg.required and len(found) < len(arg.stages):
            raise ValueError(f"{arg.stages} lack a checkpoint; check Stage.missing before resolving")
        if found:
            out += [arg.flag, found[0] if isinstance(arg, CheckpointOf) else json.dumps(found)]
    return out


def show(args: Sequence[Arg]) -> str:
    """A command as a shell line, each placeholder as its flag and ``<... of seed0/base>``."""
    return " ".join(str(a) if isinstance(a, Placeholder) else shlex.quote(a) for a in args)


@dataclass(frozen=True)
class Stage:
    """One row of the study: a ``recpost fit`` + ``recpost test`` in its own folder.

    ``fit_args`` decide the fit (and its reuse key); ``test_args`` are additions that only change the
    test (the evaluator RM), so a change there re-runs just the test.
    """

    name: str  # its folder under the output directory, and how other stages refer to it
    method: str
    setting: dict
    seed: int
    directory: Path
    fit_args: tuple[Arg, ...]
    test_args: tuple[Arg, ...] = ()
    monitor: str = DEFAULT_MONITOR[0]
    mode: str = DEFAULT_MONITOR[1]
    epochs: int | None = None  # the progress bar's length; None: unknown
    all_targets: bool = False  # also test over every held-out target (the fit selects on eval_min_rating's)

    @property
    def label(self) -> str:
        tag = "-".join(f"{k}{v}" for k, v in self.setting.items())
        return f"seed {self.seed} {self.method}" + (f" {tag}" if tag else "")

    @property
    def needs(self) -> tuple[str, ...]:
        """The earlier stages whose checkpoints this stage's commands name, in order of first use."""
        names = [s for a in (*self.fit_args, *self.test_args) if isinstance(a, Placeholder) for s in a.stages]
        return tuple(dict.fromkeys(names))

    @property
    def fit_needs(self) -> tuple[str, ...]:
        """The earlier stages whose checkpoints the fit alone needs."""
        return tuple(dict.fromkeys(s for a in self.fit_args if isinstance(a, Placeholder) for s in a.stages))

    def missing(self, checkpoints: Mapping[str, str | None], fit_only: bool = False) -> list[str]:
        """The stages whose checkpoint this stage (or only its fit) requires but ``checkpoints`` lacks."""
        args = self.fit_args if fit_only else (*self.fit_args, *self.test_args)
        return [s for a in args if isinstance(a, Placeholder) and a.required for s in a.stages if not checkpoints.get(s)]

    @property
    def fit_root(self) -> Path:
        return self.directory / "fit"

    @property
    def test_root(self) -> Path:
        return self.directory / "test"

    @property
    def test_all_root(self) -> Path:
        return self.directory / "test_all"

    @property
    def fit_command(self) -> tuple[Arg, ...]:
        """``recpost`` arguments of the fit (as ``stage.json`` records them; the runner adds the loggers)."""
        return ("fit", *self.fit_args, "--trainer.default_root_dir", str(self.fit_root))

    @property
    def test_command(self) -> tuple[Arg, ...]:
        """``recpost`` arguments of the test of this stage's own best checkpoint."""
        return ("test", *self.fit_args, *self.test_args, CheckpointOf("--ckpt_path", self.name),
                "--trainer.default_root_dir", str(self.test_root))

    @property
    def test_all_command(self) -> tuple[Arg, ...]:
        """``recpost`` arguments of the second test of the same checkpoint, over every held-out target (only
        for a stage with ``all_targets``): metrics stored as ``test_all/...``."""
        return ("test", *self.fit_args, *self.test_args, ALL_TARGETS, CheckpointOf("--ckpt_path", self.name),
                "--trainer.default_root_dir", str(self.test_all_root))

    @property
    def commands(self) -> tuple[tuple[Arg, ...], ...]:
        """Every command of the stage, in the order they run: fit, test (and the all-targets test)."""
        return (self.fit_command, self.test_command, *((self.test_all_command,) if self.all_targets else ()))

    def log(self, job: str) -> Path:
        """Where the output of ``job`` (``fit``, ``test`` or ``test_all``) goes."""
        return self.directory / f"{job}.log"

    def loggers(self, job: str) -> Path:
        """The logger config fragment of ``job`` (CSV, W&B), written by the runner."""
        return self.directory / f"{job}_loggers.yaml"


def with_loggers(command: list[str], loggers: Path) -> list[str]:
    """A resolved command that also composes the stage's logger config (last, so its loggers win)."""
    return [*command, "--config", str(loggers)]


@dataclass(frozen=True)
class Plan:
    """Every stage of a study for ``seeds`` seeds, in the order of the result rows (the runner fits a
    stage that another one needs before that one)."""

    study: Study
    out: Path
    seeds: int
    stages: tuple[Stage, ...]
    only_seed: int | None = None  # ``--only_seed``: the stages of this seed alone
    methods: tuple[str, ...] | None = None  # ``--methods``: these methods' stages and what they need alone

    @property
    def results_dir(self) -> Path:
        """Where the tables and figures go: ``out``, or ``out/seed<N>`` for one seed alone (``--only_seed``:
        the study's tables are written by the command without it, over every seed)."""
        return self.out if self.only_seed is None else self.out / f"seed{self.only_seed}"

    @property
    def seed_dirs(self) -> list[Path]:
        """The seed folders this plan fits into (each locked while it runs)."""
        return [self.out / f"seed{s}" for s in sorted({stage.seed for stage in self.stages})]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def describe(self) -> str:
        """The plan as text: one block per stage with its commands (``--dry-run``)."""
        seeds = f"{self.seeds} seed" + ("s" if self.seeds > 1 else "")
        if self.only_seed is not None:
            seeds += f", seed {self.only_seed} only"
        if self.methods is not None:
            seeds += f", methods {', '.join(self.methods)} (and the stages they need) only"
        lines = [f"experiment {self.study.name}: {len(self.stages)} stages, {seeds}, into {self.out}",
                 f"<{BEST_CHECKPOINT}.ckpt of S>: the best checkpoint of stage S, which is fitted first; "
                 "[...]: left out if S fails. Each command also composes its stage's <fit|test|test_all>_loggers.yaml."]
        lines += describe_trials(self.study.methods, self.study.trials)
        for i, stage in enumerate(self.stages, 1):
            needs = f"; needs {', '.join(stage.needs)}" if stage.needs else ""
            lines += ["", f"[{i}/{len(self.stages)}] {stage.name} ({stage.label}{needs})",
                      *(f"  recpost {show(command)}" for command in stage.commands)]
        return "\n".join(lines)


def build_plan(study: Study, out: Path, seeds: int | None = None, only_seed: int | None = None,
               methods: Sequence[str] | None = None) -> Plan:
    """The stages of ``study`` for ``seeds`` seeds (default: the study's), with folders under ``out``;
    with ``only_seed``, the stages of that seed alone, and with ``methods``, the stages of those methods and
    the stages they need (the same stages, folders and keys as in the whole plan, so the whole plan reuses
    them)."""
    n_seeds = seeds if seeds is not None else study.seeds
    if n_seeds < 1:
        raise RecpostError(f"--seeds must be >= 1 (got {n_seeds})")
    if only_seed is not None and not 0 <= only_seed < n_seeds:
        raise RecpostError(f"--only_seed {only_seed} is not one of the study's seeds 0..{n_seeds - 1}; give a seed in "
                           f"that range, or more --seeds")
    if study.pretrained and len(study.pretrained) < n_seeds:
        raise RecpostError(f"{study.path}: pretrained lists {len(study.pretrained)} checkpoints for {n_seeds} seeds; "
                           "give one per seed")
    run = range(n_seeds) if only_seed is None else [only_seed]
    stages = tuple(s for seed in run for s in _seed_stages(study, out, seed))
    if methods is not None:
        stages = _stages_of(stages, _known_methods(study, methods))
    return Plan(study, out, n_seeds, stages, only_seed, None if methods is None else tuple(methods))


def _known_methods(study: Study, methods: Sequence[str]) -> list[str]:
    """``methods`` (``--methods``), each checked against the study's."""
    import difflib

    names = [m.name for m in study.methods]
    if not methods:
        raise RecpostError(f"--methods is empty; name some of {study.name}'s methods: {', '.join(names)}")
    for name in methods:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            raise RecpostError(f"--methods: {name!r} is not a method of {study.name}" + (
                f"; did you mean {close[0]}?" if close else "") + f" (its methods: {', '.join(names)})")
    return list(methods)


def _stages_of(stages: tuple[Stage, ...], methods: list[str]) -> tuple[Stage, ...]:
    """The stages of ``methods`` and every stage they need (the base model, reward models, judges), in order."""
    keep = {s.name for s in stages if s.method in methods}
    for stage in reversed(stages):  # a stage's needs come before it
        if stage.name in keep:
            keep.update(stage.needs)
    return tuple(s for s in stages if s.name in keep)


def _seed_stages(study: Study, out: Path, seed: int) -> list[Stage]:
    """One seed's stages in row order: reward models, base (its test needs the evaluator RM and the judges),
    methods."""
    configs = [arg for path in study.base_configs for arg in ("--config", str(path))]
    seed_args = [*configs, "--seed_everything", str(seed)]
    selection = [] if (study.monitor, study.monitor_mode) == DEFAULT_MONITOR else [
        f"--checkpoint.monitor={study.monitor}", f"--checkpoint.mode={study.monitor_mode}"]
    # The paper's protocol, for the policies only: a reward model is selected and tested on every target.
    if study.eval_min_rating is not None:
        selection.append(f"--data.eval_min_rating={study.eval_min_rating:g}")
    policy = dict(monitor=study.monitor, mode=study.monitor_mode, all_targets=study.eval_min_rating is not None)

    def stage(name: str, method: str, fit_args: list[Arg], setting: dict | None = None, **kw) -> Stage:
        return Stage(f"seed{seed}/{name}", method, setting or {}, seed, out / f"seed{seed}" / name, tuple(fit_args), **kw)

    init_from: list[Arg] = ["--model.init_args.init_from", str(study.pretrained[seed])] if study.pretrained else [
        CheckpointOf("--model.init_args.init_from", f"seed{seed}/base")]
    stages: list[Stage] = []
    reward_model = None
    ensemble: list[Stage] = []  # the study's RM and the other members of the methods' reward ensemble
    test_args: tuple[Arg, ...] = ()  # what every policy's test adds: the evaluator RM when there is one
    judging: tuple[Arg, ...] = ()  # what every policy's validation and test add: the judges

    def rm_args(configs: list[Path], epochs: int | None, overrides: list[str], continued: bool = True) -> list[Arg]:
        """A rating model's configs, continued from the base checkpoint or (``continued`` off) from scratch."""
        return [*(a for c in configs for a in ("--config", str(c))), *(init_from if continued else []),
                *(["--trainer.max_epochs", str(epochs)] if epochs else []), *study.posttrain_overrides, *overrides]

    def rm_stage(name: str, method: str, role: str, index: int, args: list[Arg], extra: list[str],
                 epochs: int | None, setting: dict | None = None) -> Stage:
        fit = [*configs, "--seed_everything", str(role_seed(seed, role, index)), *args, *extra]
        return stage(name, method, fit, setting, monitor="val/rmse", mode="min", epochs=epochs)

    if study.reward_model:
        spec = study.reward_model
        args = rm_args([spec.config], spec.epochs, spec.overrides)
        reward_model = rm_stage("reward_model", "reward_model", "reward_model", 0, args, [], spec.epochs)
        stages.append(reward_model)
        if spec.evaluator:
            evaluator = rm_stage("eval_reward_model", "eval_reward_model", "evaluator", 0, args,
                                 evaluator_overrides(seed), spec.epochs)
            stages.append(evaluator)
            test_args = (CheckpointOf("--model.init_args.eval_reward_model", evaluator.name, required=False),)
        ensemble = [reward_model] + [
            rm_stage(f"reward_ensemble/member{m}", "reward_ensemble", "ensemble", m, args, ensemble_overrides(seed, m),
                     spec.epochs, {"member": m})
            for m in range(1, study.ensemble_size)]
        stages += ensemble[1:]
    if study.judges:
        judges = [rm_stage(f"judge/judge{k}", "judge", "judge", k,
                           rm_args(judge_configs(judge, study.base_configs), judge.epochs, list(judge.overrides),
                                   judge.continued),
                           judge_overrides(seed, k), judge.epochs, {"judge": k, "kind": judge.kind})
                  for k, judge in enumerate(study.judges.members())]
        stages += judges
        judging = (CheckpointsOf("--model.init_args.judges", tuple(j.name for j in judges), required=False),)
        if reward_model is not None:  # the judges' agreement with the study's RM, measured by each policy's test
            test_args += (CheckpointOf("--model.init_args.judge_reference", reward_model.name, required=False),)
    if not study.pretrained:
        stages.append(stage("base", "base", [*seed_args, *selection, *study.pretrain_overrides],
                            test_args=(*test_args, *judging), **policy))
    for method in study.methods:
        for setting in method.settings():
            tag = "-".join(f"{k}{v}" for k, v in setting.items()) or "default"
            epochs = method.epochs or study.posttrain_epochs
            args = [*seed_args, "--config", str(method.config), *init_from, "--trainer.max_epochs", str(epochs),
                    *selection, *study.posttrain_overrides, *method.overrides,
                    *[f"--model.init_args.{k}={v}" for k, v in setting.items()],
                    *_reward_model_arg(method, setting, reward_model), *_ensemble_arg(method, ensemble), *judging]
            stages.append(stage(f"{method.name}/{tag}", method.name, args, setting, test_args=test_args,
                                epochs=epochs, **policy))
    return stages


def _ensemble_arg(method: MethodSpec, ensemble: list[Stage]) -> list[Arg]:
    """The first ``reward_ensemble`` reward models of the seed, for a method that asks for an ensemble."""
    if not method.reward_ensemble:
        return []
    return [CheckpointsOf("--model.init_args.reward_ensemble", tuple(s.name for s in ensemble[:method.reward_ensemble]))]


def _reward_model_arg(method: MethodSpec, setting: dict, reward_model: Stage | None) -> list[Arg]:
    """The study's RM for a method that takes one; required where the method cannot train without it."""
    if reward_model is None or not method.takes_reward_model:
        return []
    return [CheckpointOf("--model.init_args.reward_model", reward_model.name, required=method.needs_reward_model(setting))]
