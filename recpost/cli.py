"""``recpost`` command line: ``fit | validate | test | predict`` (LightningCLI), ``experiment``, ``bench``.

``model.class_path`` picks the method (``recpost.methods.SFT``, ...); ``data.n_items``,
``data.item_map_hash`` and ``data.max_len`` are linked into the model. Configs compose left to
right after the subcommand: ``recpost fit --config data.yaml --config method.yaml --trainer.max_epochs 5``.

Every run writes into its own folder under ``trainer.default_root_dir`` (the layout is
``recpost.runs.RunFolder``): ``config.yaml``, ``metrics.csv``, ``checkpoints/best.ckpt`` (best
``val/ndcg@10``) for ``fit``, and ``val_metrics.json`` / ``test_metrics.json`` for ``validate`` / ``test``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from recpost.data import RecDataModule
from recpost.errors import RecpostError
from recpost.methods import RecModule
from recpost.runs import BEST_CHECKPOINT, RunFolder

DEFAULT_ROOT_DIR = "runs"
MONITOR = "val/ndcg@10"
# Model arguments that only change evaluation: at test time the command line wins over the checkpoint.
EVAL_TIME_ARGS = ("eval_reward_model",)


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
        path = RunFolder(log_dir).metrics_json(stage)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dict(sorted(metrics.items())), indent=2))
        os.replace(tmp, path)
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
        path = RunFolder(log_dir).per_user_csv
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w") as fh:
            fh.write(",".join(names) + "\n")
            for values in zip(*columns):
                fh.write(",".join(str(v) if isinstance(v, int) else f"{v:.6g}" for v in values) + "\n")
        os.replace(tmp, path)


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
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w") as fh:
            fh.write("user_id,rank,item_id,score\n")
            for row, user in enumerate(user_ids):
                for r in range(k):
                    fh.write(f"{user},{r + 1},{item_ids[row * k + r]},{scores[row, r].item():.6g}\n")
        os.replace(tmp, path)
        print(f"predictions written to {path}")


class RecpostCLI(LightningCLI):
    """LightningCLI with recpost's links, best-checkpoint selection and default CSV logging."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.max_len", "model.init_args.max_len")
        parser.link_arguments("data.n_items", "model.init_args.n_items", apply_on="instantiate")
        parser.link_arguments("data.item_map_hash", "model.init_args.item_map_hash", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": MONITOR,
            "checkpoint.mode": "max",
            "checkpoint.filename": BEST_CHECKPOINT,
            "checkpoint.auto_insert_metric_name": False,
            "trainer.default_root_dir": DEFAULT_ROOT_DIR,
        })

    def _parse_ckpt_path(self) -> None:
        """Lightning fills the model's arguments from ``--ckpt_path``'s hyperparameters, over the
        command line. Evaluation-only arguments given on the command line (``eval_reward_model``: score
        a trained policy with another reward model at test time) are put back on top."""
        sub = self.config.get("subcommand")
        given = {}
        if sub and self.config[sub].get("ckpt_path"):
            init_args = self.config[sub].get("model", {}).get("init_args") or {}
            given = {k: init_args.get(k) for k in EVAL_TIME_ARGS if init_args.get(k) is not None}
        super()._parse_ckpt_path()
        for key, value in given.items():
            self.config[sub]["model"]["init_args"][key] = value

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        logger = trainer.get("logger")
        if logger is not False:
            # CSV logs always (no TensorBoard dependency), first, so that trainer.log_dir (metrics.csv,
            # checkpoints, *_metrics.json) is the CSV folder; W&B and others come through trainer.logger.
            loggers = [] if logger in (None, True) else list(logger) if isinstance(logger, list) else [logger]
            if not any("CSVLogger" in str(_class_path(lg)) for lg in loggers):
                loggers.insert(0, {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": trainer.get("default_root_dir") or DEFAULT_ROOT_DIR},
                })
            trainer["logger"] = loggers[0] if len(loggers) == 1 else loggers
        callbacks = trainer.get("callbacks") or []
        trainer["callbacks"] = [*callbacks, {"class_path": "recpost.cli.MetricsWriter"}]
        if self.subcommand == "predict":
            trainer["callbacks"].append({"class_path": "recpost.cli.PredictionWriter"})


def _class_path(logger) -> str:
    """The class path of a logger given in a config (a dict / Namespace with class_path, or a string)."""
    if isinstance(logger, str):
        return logger
    getter = getattr(logger, "get", None)
    return getter("class_path", "") if getter else type(logger).__name__


def run_lightning_cli(args: list[str] | None = None) -> RecpostCLI:
    return RecpostCLI(
        RecModule,
        RecDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


# Commands that are plain typed functions (litgpt's style), beside LightningCLI's fit/validate/test/predict:
# name -> (module, function). The function's signature and docstring are its command line and --help.
FUNCTION_COMMANDS = {
    "experiment": ("recpost.experiment", "experiment"),
    "bench": ("recpost.bench", "bench"),
}


def run_function_cli(name: str, args: list[str]) -> None:
    """A ``FUNCTION_COMMANDS`` command: arguments from the function's typed signature.

    (``jsonargparse.CLI`` would reserve ``--config`` for its own config files; for ``experiment``,
    ``--config`` is the experiment YAML, as users expect.) ``--some-flag`` is accepted for a boolean
    ``some_flag``, as users spell flags.
    """
    import importlib
    import inspect

    from jsonargparse import ArgumentParser

    module, function = FUNCTION_COMMANDS[name]
    fn = getattr(importlib.import_module(module), function)
    flags = {f"--{p.replace('_', '-')}": f"--{p}=true" for p, param in inspect.signature(fn).parameters.items()
             if param.annotation in (bool, "bool") and "_" in p}
    args = [flags.get(a, a) for a in args]
    parser = ArgumentParser(prog=f"recpost {name}", description=fn.__doc__.splitlines()[0])
    parser.add_function_arguments(fn)
    fn(**parser.parse_args(args).as_dict())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``recpost`` console script and ``python -m recpost``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] and args[0] in FUNCTION_COMMANDS:
            run_function_cli(args[0], args[1:])
        else:
            run_lightning_cli(argv)
    except Exception as exc:  # noqa: BLE001 - user errors become one line; anything else propagates
        user_error = _user_error(exc)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


def _user_error(exc: BaseException | None) -> RecpostError | None:
    """The ``RecpostError`` behind ``exc``, if any: jsonargparse wraps errors raised while it
    instantiates a subclass (e.g. ``model.lam: 0``) in its own exception."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RecpostError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
