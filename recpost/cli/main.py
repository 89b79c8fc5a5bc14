"""``recpost`` command line: ``fit | validate | test | predict`` (LightningCLI) and the ``FUNCTION_COMMANDS``
(``experiment``, ``bench``, ...); ``recpost --help`` lists them all.

``model.class_path`` picks the method (``recpost.methods.SFT``, ...); ``data.n_items``,
``data.item_map_hash`` and ``data.max_len`` are linked into the model. Configs compose left to
right after the subcommand: ``recpost fit --config data.yaml --config method.yaml --trainer.max_epochs 5``.

Where files go is ``recpost.core.runs``: a fit writes ``<trainer.default_root_dir>/lightning_logs/version_N/``
(``config.yaml``, ``metrics.csv``, ``checkpoints/best.ckpt`` and ``checkpoints/last.ckpt``) and ends by
printing the best checkpoint and its score; ``--ckpt_path last`` continues the newest run in its folder,
exactly. ``validate`` / ``test`` / ``predict`` of a run's checkpoint write next to it
(``<run>/test/version_K/test_metrics.json``, ...). Every ``--ckpt_path`` passes the checkpoint gate
(``recpost.models.checkpoint.read_checkpoint``) before Lightning opens it. A user's mistake ends with one line on
stderr and exit code 2 (``recpost.cli.console``, ``recpost.cli.arguments``).
"""

from __future__ import annotations

import difflib
import sys
from argparse import ArgumentError
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.fabric.plugins import TorchCheckpointIO

from recpost.cli.arguments import EVAL_TIME_SETTINGS, explain_parse_error, given_model_settings, refuse_training_flags
from recpost.cli.callbacks import BestCheckpoint, ElapsedTime, FitSummary, ResumeCheckpoint, ValidationSchedule
from recpost.models.checkpoint import AtomicCheckpointIO, read_checkpoint
from recpost.cli.console import configure_output, quiet_evaluation_warnings, quiet_resume_warnings, user_error
from recpost.data import RecDataModule
from recpost.core.configs import config_args
from recpost.core.errors import RecpostError
from recpost.core.files import atomic_open, write_json
from recpost.methods import RecModule
from recpost.core.runs import BEST_CHECKPOINT, LOGS_DIR, RunFolder, resume_point, run_folders, writable_folder

DEFAULT_ROOT_DIR = "runs"
MONITOR = "val/ndcg@10"


class MetricsWriter(L.Callback):
    """Writes the final evaluation metrics of ``validate`` / ``test`` as flat JSON into the log dir.

    The file is written to a temporary name and renamed, so an interrupted run never leaves a file
    that looks complete. Ranks other than 0 write nothing.
    """

    def _write(self, trainer: L.Trainer, stage: str) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or not metrics:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        path = write_json(RunFolder(log_dir).metrics_json(stage), dict(sorted(metrics.items())))
        print(f"{stage} metrics written to {path}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, "test")
        self._write_per_user(trainer, getattr(pl_module, "test_per_user", None))

    @staticmethod
    def _write_per_user(trainer: L.Trainer, rows: dict | None) -> None:
        """``test_per_user.csv``: one row per test user (``user_index`` and each per-user metric), for
        paired comparisons between runs on the same users (the experiment's bootstrap intervals)."""
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collective: every rank asks
        if not trainer.is_global_zero or not rows:
            return
        names = list(rows)
        columns = [rows[n].double().cpu().tolist() if n != "user_index" else rows[n].cpu().tolist() for n in names]
        with atomic_open(RunFolder(log_dir).per_user_csv) as fh:
            fh.write(",".join(names) + "\n")
            for values in zip(*columns):
                fh.write(",".join(str(v) if isinstance(v, int) else f"{v:.6g}" for v in values) + "\n")


class PredictionWriter(BasePredictionWriter):
    """``recpost predict`` writes ``predictions.csv`` (user_id, rank, item_id, score) with the source's ids.

    Under DDP the ranks' predictions are gathered; rank 0 drops users that the unrepeated sampler
    could not have repeated anyway (a safeguard) and writes a temporary file renamed into place.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        import torch

        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collective: every rank asks
        dm = trainer.datamodule
        users = torch.cat([p["user_index"] for p in predictions])  # [U]
        items = torch.cat([p["items"] for p in predictions])  # [U, k]
        scores = torch.cat([p["scores"] for p in predictions])  # [U, k]
        gathered = trainer.strategy.all_gather({"u": users, "i": items, "s": scores}) if trainer.world_size > 1 else None
        if not trainer.is_global_zero:
            return
        if gathered is not None:
            users, items, scores = (gathered[k].reshape(-1, *gathered[k].shape[2:]) for k in ("u", "i", "s"))
        keep = torch.unique(users, sorted=True, return_inverse=True)[1]
        first = torch.full((int(keep.max()) + 1,), len(users), dtype=torch.long).scatter_reduce(
            0, keep, torch.arange(len(users)), reduce="amin")
        users, items, scores = users[first], items[first], scores[first]
        user_ids = dm.data.user_ids.data.table.column("user_id").take(users.numpy()).to_pylist()
        item_ids = dm.original_item_ids(items.numpy())
        k = items.shape[1]
        log_dir.mkdir(parents=True, exist_ok=True)
        path = RunFolder(log_dir).predictions_csv
        with atomic_open(path) as fh:
            fh.write("user_id,rank,item_id,score\n")
            for row, user in enumerate(user_ids):
                for r in range(k):
                    fh.write(f"{user},{r + 1},{item_ids[row * k + r]},{scores[row, r].item():.6g}\n")
        print(f"predictions written to {path}")


class RecpostCLI(LightningCLI):
    """LightningCLI with recpost's links, best-checkpoint selection, default CSV logging, the checkpoint gate
    for ``--ckpt_path`` and parse errors in one line."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.max_len", "model.init_args.max_len")
        parser.link_arguments("data.n_items", "model.init_args.n_items", apply_on="instantiate")
        parser.link_arguments("data.item_map_hash", "model.init_args.item_map_hash", apply_on="instantiate")
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")  # the starting weights a candidate too
        parser.add_lightning_class_args(ValidationSchedule, "validation")  # at start, every N optimiser steps
        parser.set_defaults({
            "checkpoint.monitor": MONITOR,
            "checkpoint.mode": "max",
            "checkpoint.filename": BEST_CHECKPOINT,
            "checkpoint.auto_insert_metric_name": False,
            "trainer.default_root_dir": DEFAULT_ROOT_DIR,
        })

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        """LightningCLI's parsers, or the ones :func:`prebuild_parser` built before this process was forked
        (building them costs ~1 CPU s a command: jsonargparse reads every class signature)."""
        built = _PREBUILT.pop("parsers", None)
        if built is None or not add_subcommands:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            return
        self.parser, self._subcommand_parsers, self._subcommand_method_arguments = built

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse; a bad key or value becomes one line naming it (and the closest accepted key)."""
        self.argv = list(sys.argv[1:] if args is None else args)
        self.checkpoint: dict | None = None  # the --ckpt_path checkpoint, once through the gate
        self.run_of_checkpoint: RunFolder | None = None
        self.resumes_in_place = False  # a fit continuing its own run folder
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            sub = next((a for a in self.argv if a in self._subcommand_parsers), None)
            known = [o.lstrip("-") for o in self._subcommand_parsers[sub]._option_string_actions] if sub else []
            raise RecpostError(explain_parse_error(str(exc), known)) from None

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path`` through the checkpoint gate before Lightning opens it (``last`` / ``best``: the
        newest run's). Lightning then fills the model's settings from the checkpoint, over the command line;
        evaluation-time settings given on the command line or in a config are put back on top, and a
        training-only setting given as a flag that differs from the checkpoint is refused."""
        sub = self.config.get("subcommand")
        value = self.config[sub].get("ckpt_path") if sub else None
        if not value or value in ("hpc", "registry") or str(value).startswith("registry:"):
            super()._parse_ckpt_path()
            return
        root = self.config[sub]["trainer"].get("default_root_dir") or DEFAULT_ROOT_DIR
        path = resume_point(root) if value == "last" else _best_of_newest_run(root) if value == "best" else Path(value)
        self.checkpoint = read_checkpoint(path, "--ckpt_path")
        if sub == "fit" and "loops" not in self.checkpoint:
            raise RecpostError(f"--ckpt_path {path} holds weights only, no training state to resume; to start a new "
                               "fit from its weights use --model.init_args.init_from")
        self.config[sub]["ckpt_path"] = str(path)
        self.run_of_checkpoint = RunFolder.of_checkpoint(path)
        flags, in_files = given_model_settings(self.argv)
        init_args = (self.config[sub].get("model") or {}).get("init_args") or {}
        refuse_training_flags(flags, init_args, self.checkpoint.get("hyper_parameters", {}), str(path))
        given = {flag.split(".")[0] for flag in flags} | in_files
        keep = {k: init_args.get(k) for k in EVAL_TIME_SETTINGS if k in given}
        try:
            super()._parse_ckpt_path()
        except ArgumentError as exc:
            raise RecpostError(f"--ckpt_path {path}: its hyperparameters do not fit the model "
                               f"({explain_parse_error(str(exc))}); is it a recpost checkpoint?") from None
        for key, setting in keep.items():
            self.config[sub]["model"]["init_args"][key] = setting

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        root = trainer.get("default_root_dir") or DEFAULT_ROOT_DIR
        writable_folder(root, "trainer.default_root_dir")
        logger = trainer.get("logger")
        if logger is not False:
            # CSV logs always (no TensorBoard dependency), first, so that trainer.log_dir (metrics.csv,
            # checkpoints, *_metrics.json) is the CSV folder; W&B and others come through trainer.logger.
            loggers = [] if logger in (None, True) else list(logger) if isinstance(logger, list) else [logger]
            if not any("CSVLogger" in str(_class_path(lg)) for lg in loggers):
                loggers.insert(0, {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": self._csv_folder(root)})
            trainer["logger"] = loggers[0] if len(loggers) == 1 else loggers
        if self.subcommand in ("validate", "test", "predict"):
            quiet_evaluation_warnings()
        callbacks = list(trainer.get("callbacks") or [])
        wanted = ["recpost.cli.MetricsWriter"] + (["recpost.cli.PredictionWriter"] if self.subcommand == "predict" else [])
        present = {str(_class_path(cb)).rpartition(".")[2] for cb in callbacks}
        trainer["callbacks"] = callbacks + [{"class_path": c} for c in wanted if c.rpartition(".")[2] not in present]

    def _csv_folder(self, root: str) -> dict:
        """Where the CSV logger (and so the run's files) goes: a fit resumed from its own run's checkpoint
        continues in that run's folder; validate / test / predict of a checkpoint inside a run folder write
        next to it (``<run>/test/version_K``), unless ``--trainer.default_root_dir`` is given on the
        command line; otherwise a new ``<default_root_dir>/lightning_logs/version_N``."""
        run, root = self.run_of_checkpoint, Path(root).expanduser().resolve()  # absolute: resumes match it
        if run is not None and self.subcommand == "fit" and run.path.parent == root / LOGS_DIR:
            quiet_resume_warnings()
            self.resumes_in_place = True
            return {"save_dir": str(root), "version": run.version}
        root_given = any(a.split("=")[0] == "--trainer.default_root_dir" for a in self.argv)
        if run is not None and self.subcommand != "fit" and not root_given:
            return {"save_dir": str(run.path), "name": self.subcommand}
        return {"save_dir": str(root)}

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The Trainer, writing checkpoints atomically in the run folder (unless a config chose its own writer)."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        resume = next((cb for cb in self.trainer.callbacks if isinstance(cb, ResumeCheckpoint)), None)
        if resume is not None and self.resumes_in_place and self.checkpoint is not None:
            resume.keep_rows(self.run_of_checkpoint.metrics_csv, self.checkpoint)


def _best_of_newest_run(root: str) -> Path:
    runs = [run for run in run_folders(root) if run.best_checkpoint.is_file()]
    if not runs:
        raise RecpostError(f"--ckpt_path best: no run under {Path(root) / LOGS_DIR} has a best checkpoint; pass a path")
    return runs[-1].best_checkpoint


def _class_path(logger) -> str:
    """The class path of a logger given in a config (a dict / Namespace with class_path, or a string)."""
    if isinstance(logger, str):
        return logger
    getter = getattr(logger, "get", None)
    return getter("class_path", "") if getter else type(logger).__name__


# The parsers prebuild_parser() built, taken by the next RecpostCLI (once: a process forked from the builder).
_PREBUILT: dict[str, tuple] = {}


class _Built(Exception):
    """Stops a RecpostCLI once its parsers are built (prebuild_parser)."""


def prebuild_parser() -> None:
    """Build LightningCLI's parsers now, for the next ``fit|validate|test|predict`` in this process.

    For a process that forks commands (recpost.cli.zygote): each forked child gets its own copy of the built
    parsers, so parsing in one never reaches another. The parsers depend on the classes alone, not on the
    command line, the working folder or the environment (configs and class paths are read when parsing)."""

    class _BuildOnly(RecpostCLI):
        def parse_arguments(self, parser, args) -> None:
            raise _Built(self.parser, self._subcommand_parsers, self._subcommand_method_arguments)

    try:
        run_lightning_cli([], cli_class=_BuildOnly)
    except _Built as built:
        _PREBUILT["parsers"] = built.args


def run_lightning_cli(args: list[str] | None = None, cli_class: type[RecpostCLI] | None = None) -> RecpostCLI:
    no_exit = {"exit_on_error": False}
    return (cli_class or RecpostCLI)(
        RecModule,
        RecDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [ResumeCheckpoint(), FitSummary(), ElapsedTime()]},
        parser_kwargs={**no_exit, **{sub: no_exit for sub in LIGHTNING_COMMANDS}},
        args=args,
    )


# LightningCLI's commands, as `recpost --help` lists them.
LIGHTNING_COMMANDS = {
    "fit": "train a method; keeps checkpoints/best.ckpt (best val/ndcg@10) and checkpoints/last.ckpt (resume point)",
    "validate": "validation metrics of a checkpoint -> val_metrics.json",
    "test": "test metrics of a checkpoint -> test_metrics.json and test_per_user.csv",
    "predict": "top-10 unseen items per user from a checkpoint -> predictions.csv",
}

# Commands that are plain typed functions (litgpt's style), beside LightningCLI's fit/validate/test/predict:
# name -> (module, function). The function's signature and docstring are its command line and --help.
FUNCTION_COMMANDS = {
    "experiment": ("recpost.experiment", "experiment"),
    "bench": ("recpost.bench", "bench"),
    "export": ("recpost.serving.export", "export"),
    "recommend": ("recpost.serving.serve", "recommend"),
}
# Commands with positional arguments (`recpost configs cp NAME DEST`) parse their own: name -> (module, function(args)).
OWN_PARSER_COMMANDS = {"configs": ("recpost.cli.configs", "configs"),
                       "report": ("recpost.experiment.rerender", "report_command")}


def overview() -> str:
    """``recpost --help``: every command with one line (a function command's line is its docstring's first)."""
    lines = ["usage: recpost <command> [options]        (recpost <command> --help: the command's options)", "",
             "Post-training for generative recommenders, on PyTorch Lightning.", "", "commands:"]
    commands = {**LIGHTNING_COMMANDS, **{name: _first_doc_line(*where)
                                         for name, where in {**FUNCTION_COMMANDS, **OWN_PARSER_COMMANDS}.items()}}
    width = max(map(len, commands))
    lines += [f"  {name:<{width}}  {line}" for name, line in commands.items()]
    return "\n".join(lines)


def _first_doc_line(module: str, function: str) -> str:
    """The first docstring line of ``module.function``, read from the source (no import: --help stays fast)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function), None)
    doc = ast.get_docstring(fn) if fn is not None else None
    return doc.splitlines()[0].rstrip(".") if doc else ""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``recpost`` console script and ``python -m recpost``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        sys.exit(0 if args else 2)
    if args[0] in ("-V", "--version"):
        from recpost import __version__

        print(f"recpost {__version__}")
        sys.exit(0)
    configure_output()
    try:
        if args[0] in FUNCTION_COMMANDS:
            from recpost.cli.functions import run_function_cli

            run_function_cli(args[0], *FUNCTION_COMMANDS[args[0]], args[1:])
        elif args[0] in OWN_PARSER_COMMANDS:
            import importlib

            module, function = OWN_PARSER_COMMANDS[args[0]]
            getattr(importlib.import_module(module), function)(args[1:])
        elif not args[0].startswith("-") and args[0] not in LIGHTNING_COMMANDS:
            known = [*LIGHTNING_COMMANDS, *FUNCTION_COMMANDS, *OWN_PARSER_COMMANDS]
            close = difflib.get_close_matches(args[0], known, n=1)
            raise RecpostError(f"no command {args[0]!r}" + (f"; did you mean {close[0]}?" if close else "")
                               + " (recpost --help lists the commands)")
        else:
            resolved = config_args(args)  # a shipped config's name -> its path, before jsonargparse reads it
            if argv is None:
                sys.argv[1:] = resolved  # LightningCLI reads sys.argv itself (and warns if args are given as well)
            run_lightning_cli(None if argv is None else resolved)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - user errors become one line; anything else propagates
        message = user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
