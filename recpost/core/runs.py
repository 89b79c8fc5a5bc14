"""Where a run's files live: the one definition of the run-folder layout.

Every ``recpost fit`` run writes into its own folder ``<trainer.default_root_dir>/lightning_logs/version_N/``
(Lightning's CSV logger picks N; ``--ckpt_path last`` continues the newest run in its folder)::

    config.yaml              the full resolved config (re-runnable with --config)
    hparams.yaml             the model's hyperparameters
    metrics.csv              every logged value, one row per logging step
    checkpoints/best.ckpt    the best epoch on the monitored validation metric
    checkpoints/last.ckpt    the end of the last finished epoch: where ``--ckpt_path last`` resumes

``recpost validate | test | predict`` of a checkpoint inside a run folder write next to it, into
``<run>/validate/version_K/``, ``<run>/test/version_K/`` or ``<run>/predict/version_K/`` (a checkpoint
from elsewhere: ``<trainer.default_root_dir>/lightning_logs/version_N/``)::

    config.yaml, metrics.csv as above
    val_metrics.json         validate: the final validation metrics
    test_metrics.json        test: the final test metrics
    test_per_user.csv        test: one row per test user (paired comparisons between runs)
    predictions.csv          predict: top-k items per user

The CLI, the experiment runner, ``recpost bench`` and the tests find these files through
:class:`RunFolder` and :func:`latest_run`, never by spelling the names again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from recpost.core.errors import RecpostError

LOGS_DIR = "lightning_logs"
VERSION_PREFIX = "version_"
BEST_CHECKPOINT = "best"  # the ModelCheckpoint filename (Lightning adds .ckpt)
LAST_CHECKPOINT = "last"  # Lightning's name for the resume point (ModelCheckpoint.CHECKPOINT_NAME_LAST)
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class RunFolder:
    """One run's folder (``.../lightning_logs/version_N``) and the files in it."""

    path: Path

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunFolder | None:
        """The run a checkpoint file belongs to (``<run>/checkpoints/<name>.ckpt``), or None if it lies elsewhere."""
        parent = Path(checkpoint).expanduser().resolve().parent
        run = parent.parent
        is_run = run.name.startswith(VERSION_PREFIX) and run.name[len(VERSION_PREFIX):].isdigit()
        return cls(run) if parent.name == CHECKPOINTS_DIR and is_run else None

    @property
    def version(self) -> int:
        return int(self.path.name[len(VERSION_PREFIX):])

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def hparams(self) -> Path:
        return self.path / "hparams.yaml"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / f"{BEST_CHECKPOINT}.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / f"{LAST_CHECKPOINT}.ckpt"

    def evaluations(self, subcommand: Literal["validate", "test", "predict"]) -> Path:
        """Where ``recpost <subcommand>`` of this run's checkpoints puts its runs (``version_K`` below it)."""
        return self.path / subcommand

    def metrics_json(self, stage: Literal["val", "test"]) -> Path:
        return self.path / f"{stage}_metrics.json"

    @property
    def per_user_csv(self) -> Path:
        return self.path / "test_per_user.csv"

    @property
    def predictions_csv(self) -> Path:
        return self.path / "predictions.csv"


def run_folders(root: str | Path, logs: str = LOGS_DIR) -> list[RunFolder]:
    """The runs under ``root/logs`` (``root`` a ``default_root_dir``; or a run and ``logs`` its ``test``
    folder), oldest first (``version_10`` after ``version_9``)."""
    found = [p for p in (Path(root) / logs).glob(f"{VERSION_PREFIX}*") if p.name[len(VERSION_PREFIX):].isdigit()]
    return sorted((RunFolder(p) for p in found), key=lambda run: run.version)


def latest_run(root: str | Path, logs: str = LOGS_DIR) -> RunFolder:
    """The newest run under ``root/logs``; one-line error when there is none."""
    runs = run_folders(root, logs)
    if not runs:
        raise RecpostError(f"no run folder under {Path(root) / logs}; did the fit or test run start?")
    return runs[-1]


def resume_point(root: str | Path) -> Path:
    """``last.ckpt`` of the newest run under ``root`` that has one: what ``--ckpt_path last`` continues."""
    runs = [run for run in run_folders(root) if run.last_checkpoint.is_file()]
    if not runs:
        raise RecpostError(f"--ckpt_path last: no run under {Path(root) / LOGS_DIR} has a "
                           f"{CHECKPOINTS_DIR}/{LAST_CHECKPOINT}.ckpt (it is written at the end of each training "
                           "epoch); start the fit without --ckpt_path, or pass a checkpoint path")
    return runs[-1].last_checkpoint


def writable_folder(path: str | Path, what: str) -> Path:
    """``path`` as a folder files can be written to (created if missing); one-line error when it is a file,
    lies under a file, or cannot be written."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise RecpostError(f"{what} {folder} is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".recpost-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise RecpostError(f"{what} {folder} cannot be written ({exc.strerror or exc}); choose a writable folder") from None
    return folder
