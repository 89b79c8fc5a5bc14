"""Where a run's files live: the one definition of the run-folder layout.

Every ``recpost fit | validate | test | predict`` run writes into its own folder
``<trainer.default_root_dir>/lightning_logs/version_N/`` (Lightning's CSV logger picks N)::

    config.yaml              the full resolved config (re-runnable with --config)
    hparams.yaml             the model's hyperparameters
    metrics.csv              every logged value, one row per logging step
    checkpoints/best.ckpt    fit: the best epoch on the monitored validation metric
    val_metrics.json         validate: the final validation metrics
    test_metrics.json        test: the final test metrics
    test_per_user.csv        test: one row per test user (paired comparisons between runs)
    predictions.csv          predict: top-k items per user

The CLI, the experiment runner, ``recpost bench`` and the tests find these files through
:class:`RunFolder` and :func:`latest_run`, never by spelling the names again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from recpost.errors import RecpostError

LOGS_DIR = "lightning_logs"
VERSION_PREFIX = "version_"
BEST_CHECKPOINT = "best"  # the ModelCheckpoint filename (Lightning adds .ckpt)


@dataclass(frozen=True)
class RunFolder:
    """One run's folder (``.../lightning_logs/version_N``) and the files in it."""

    path: Path

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
        return self.path / "checkpoints"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / f"{BEST_CHECKPOINT}.ckpt"

    def metrics_json(self, stage: Literal["val", "test"]) -> Path:
        return self.path / f"{stage}_metrics.json"

    @property
    def per_user_csv(self) -> Path:
        return self.path / "test_per_user.csv"

    @property
    def predictions_csv(self) -> Path:
        return self.path / "predictions.csv"


def run_folders(root: str | Path) -> list[RunFolder]:
    """The runs under ``root`` (a ``default_root_dir``), oldest first (``version_10`` after ``version_9``)."""
    found = [p for p in (Path(root) / LOGS_DIR).glob(f"{VERSION_PREFIX}*") if p.name[len(VERSION_PREFIX):].isdigit()]
    return sorted((RunFolder(p) for p in found), key=lambda run: run.version)


def latest_run(root: str | Path) -> RunFolder:
    """The newest run under ``root``; one-line error when there is none."""
    runs = run_folders(root)
    if not runs:
        raise RecpostError(f"no run folder under {Path(root) / LOGS_DIR}; did the fit or test run start?")
    return runs[-1]
