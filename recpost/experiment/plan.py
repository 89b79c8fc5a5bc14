"""The study as a list of stages, built once: every ``recpost`` command line of an experiment comes from here.

Per seed, in the order of the result rows: the reward model and the evaluator reward model (both
continued from the base checkpoint), the base model (pretrained here unless the study lists
checkpoints), then every method over its grid. An argument that names an earlier stage's checkpoint is
a :class:`CheckpointOf` placeholder, filled in by the runner once that stage has been fitted. The
runner fits a needed stage before the stage that needs it, so the base model is fitted first although
its row comes after the reward models: its test waits for the evaluator RM that scores it.

``recpost experiment --dry-run`` prints :meth:`Plan.describe`; the runner executes the same stages.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from recpost.errors import RecpostError
from recpost.experiment.study import MethodSpec, Study
from recpost.runs import BEST_CHECKPOINT

# Offset of the evaluator reward model's seed: another initialisation and batch order.
EVALUATOR_SEED_OFFSET = 1000
DEFAULT_MONITOR = ("val/ndcg@10", "max")  # what the pretrain and method configs select on already


def evaluator_overrides(seed: int) -> list[str]:
    """The evaluator RM's extra overrides: it trains on a bootstrap resample of the training users.

    Another seed alone (``--seed_everything seed + EVALUATOR_SEED_OFFSET``) gives another
    initialisation and batch order, but the same users: its errors would be correlated with the
    training RM's, and a policy that exploits the training RM would look good to the evaluator too. A
    resample of the users (seeded by the same offset seed) makes the two RMs err on different users.
    """
    return ["--data.train_users=bootstrap", f"--data.train_users_seed={seed + EVALUATOR_SEED_OFFSET}"]


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


Arg = str | CheckpointOf


def resolve(args: Sequence[Arg], checkpoints: Mapping[str, str | None]) -> list[str]:
    """``args`` with each placeholder replaced by its flag and the checkpoint of its stage; an optional
    placeholder whose stage has no checkpoint is left out. A required one must have its checkpoint."""
    out: list[str] = []
    for arg in args:
        if isinstance(arg, str):
            out.append(arg)
        elif checkpoints.get(arg.stage):
            out += [arg.flag, str(checkpoints[arg.stage])]
        elif arg.required:
            raise ValueError(f"{arg.stage} has no checkpoint; check Stage.missing before resolving")
    return out


def show(args: Sequence[Arg]) -> str:
    """A command as a shell line, each placeholder as its flag and ``<... of seed0/base>``."""
    return " ".join(str(a) if isinstance(a, CheckpointOf) else shlex.quote(a) for a in args)


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

    @property
    def label(self) -> str:
        tag = "-".join(f"{k}{v}" for k, v in self.setting.items())
        return f"seed {self.seed} {self.method}" + (f" {tag}" if tag else "")

    @property
    def needs(self) -> tuple[str, ...]:
        """The earlier stages whose checkpoints this stage's commands name, in order of first use."""
        names = [a.stage for a in (*self.fit_args, *self.test_args) if isinstance(a, CheckpointOf)]
        return tuple(dict.fromkeys(names))

    @property
    def fit_needs(self) -> tuple[str, ...]:
        """The earlier stages whose checkpoints the fit alone needs."""
        return tuple(dict.fromkeys(a.stage for a in self.fit_args if isinstance(a, CheckpointOf)))

    def missing(self, checkpoints: Mapping[str, str | None], fit_only: bool = False) -> list[str]:
        """The stages whose checkpoint this stage (or only its fit) requires but ``checkpoints`` lacks."""
        args = self.fit_args if fit_only else (*self.fit_args, *self.test_args)
        return [a.stage for a in args if isinstance(a, CheckpointOf) and a.required and not checkpoints.get(a.stage)]

    @property
    def fit_root(self) -> Path:
        return self.directory / "fit"

    @property
    def test_root(self) -> Path:
        return self.directory / "test"

    @property
    def fit_command(self) -> tuple[Arg, ...]:
        """``recpost`` arguments of the fit (as ``stage.json`` records them; the runner adds the loggers)."""
        return ("fit", *self.fit_args, "--trainer.default_root_dir", str(self.fit_root))

    @property
    def test_command(self) -> tuple[Arg, ...]:
        """``recpost`` arguments of the test of this stage's own best checkpoint."""
        return ("test", *self.fit_args, *self.test_args, CheckpointOf("--ckpt_path", self.name),
                "--trainer.default_root_dir", str(self.test_root))

    def log(self, job: str) -> Path:
        """Where the output of ``job`` (``fit`` or ``test``) goes."""
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

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def describe(self) -> str:
        """The plan as text: one block per stage with its commands (``--dry-run``)."""
        seeds = f"{self.seeds} seed" + ("s" if self.seeds > 1 else "")
        lines = [f"experiment {self.study.name}: {len(self.stages)} stages, {seeds}, into {self.out}",
                 f"<{BEST_CHECKPOINT}.ckpt of S>: the best checkpoint of stage S, which is fitted first; "
                 "[...]: left out if S fails. Each command also composes its stage's <fit|test>_loggers.yaml."]
        for i, stage in enumerate(self.stages, 1):
            needs = f"; needs {', '.join(stage.needs)}" if stage.needs else ""
            lines += ["", f"[{i}/{len(self.stages)}] {stage.name} ({stage.label}{needs})",
                      f"  recpost {show(stage.fit_command)}", f"  recpost {show(stage.test_command)}"]
        return "\n".join(lines)


def build_plan(study: Study, out: Path, seeds: int | None = None) -> Plan:
    """The stages of ``study`` for ``seeds`` seeds (default: the study's), with folders under ``out``."""
    n_seeds = seeds if seeds is not None else study.seeds
    if n_seeds < 1:
        raise RecpostError(f"--seeds must be >= 1 (got {n_seeds})")
    if study.pretrained and len(study.pretrained) < n_seeds:
        raise RecpostError(f"{study.path}: pretrained lists {len(study.pretrained)} checkpoints for {n_seeds} seeds; "
                           "give one per seed")
    stages = tuple(s for seed in range(n_seeds) for s in _seed_stages(study, out, seed))
    return Plan(study, out, n_seeds, stages)


def _seed_stages(study: Study, out: Path, seed: int) -> list[Stage]:
    """One seed's stages in row order: reward models, base (its test needs the evaluator RM), methods."""
    configs = [arg for path in study.base_configs for arg in ("--config", str(path))]
    seed_args = [*configs, "--seed_everything", str(seed)]
    selection = [] if (study.monitor, study.monitor_mode) == DEFAULT_MONITOR else [
        f"--checkpoint.monitor={study.monitor}", f"--checkpoint.mode={study.monitor_mode}"]

    def stage(name: str, method: str, fit_args: list[Arg], setting: dict | None = None, **kw) -> Stage:
        return Stage(f"seed{seed}/{name}", method, setting or {}, seed, out / f"seed{seed}" / name, tuple(fit_args), **kw)

    init_from: list[Arg] = ["--model.init_args.init_from", str(study.pretrained[seed])] if study.pretrained else [
        CheckpointOf("--model.init_args.init_from", f"seed{seed}/base")]
    stages: list[Stage] = []
    reward_model = None
    test_args: tuple[Arg, ...] = ()  # what every policy's test adds: the evaluator RM when there is one
    if study.reward_model:
        spec = study.reward_model
        rm_args = ["--config", str(spec.config), *init_from,
                   *(["--trainer.max_epochs", str(spec.epochs)] if spec.epochs else []),
                   *study.posttrain_overrides, *spec.overrides]
        rm = dict(monitor="val/rmse", mode="min", epochs=spec.epochs)
        reward_model = stage("reward_model", "reward_model", [*seed_args, *rm_args], **rm)
        stages.append(reward_model)
        if spec.evaluator:
            evaluator = stage("eval_reward_model", "eval_reward_model", [
                *configs, "--seed_everything", str(seed + EVALUATOR_SEED_OFFSET), *rm_args, *evaluator_overrides(seed)], **rm)
            stages.append(evaluator)
            test_args = (CheckpointOf("--model.init_args.eval_reward_model", evaluator.name, required=False),)
    if not study.pretrained:
        stages.append(stage("base", "base", [*seed_args, *selection, *study.pretrain_overrides], test_args=test_args,
                            monitor=study.monitor, mode=study.monitor_mode))
    for method in study.methods:
        for setting in method.settings():
            tag = "-".join(f"{k}{v}" for k, v in setting.items()) or "default"
            epochs = method.epochs or study.posttrain_epochs
            args = [*seed_args, "--config", str(method.config), *init_from, "--trainer.max_epochs", str(epochs),
                    *selection, *study.posttrain_overrides, *method.overrides,
                    *[f"--model.init_args.{k}={v}" for k, v in setting.items()],
                    *_reward_model_arg(method, setting, reward_model)]
            stages.append(stage(f"{method.name}/{tag}", method.name, args, setting, test_args=test_args,
                                monitor=study.monitor, mode=study.monitor_mode, epochs=epochs))
    return stages


def _reward_model_arg(method: MethodSpec, setting: dict, reward_model: Stage | None) -> list[Arg]:
    """The study's RM for a method that takes one; required where the method cannot train without it."""
    if reward_model is None or not method.takes_reward_model:
        return []
    return [CheckpointOf("--model.init_args.reward_model", reward_model.name, required=method.needs_reward_model(setting))]
