"""Lightning callbacks every ``recpost fit`` gets: ``last.ckpt`` beside ``best.ckpt`` for an exact
resume, the closing line that names both, and the elapsed wall time at each validation.

``recpost fit ... --ckpt_path last`` continues a run to the same weights and metrics as a run that was
never stopped. Lightning restores the weights, the optimiser, the schedulers and the loop counters; what
it does not restore is the random state (dropout masks, PPO's and DPO's samples, the order in which the
next epoch's training windows are shuffled) and the rows of ``metrics.csv`` not yet flushed to disk.
:class:`ResumeCheckpoint` keeps both: ``last.ckpt`` is written at the end of every training epoch with
the random state, after every logged row has reached ``metrics.csv``. The training loader cannot restart
in the middle of an epoch, so a run killed mid-epoch repeats that epoch from its start.
"""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from recpost.core.runs import LAST_CHECKPOINT


def random_state() -> dict[str, Any]:
    """Every random generator a fit draws from, as plain values and tensors (loadable with ``weights_only``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Put back what :func:`random_state` took."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` at the end of every training epoch, with the random state, every logged row
    flushed to ``metrics.csv`` first, so that ``--ckpt_path last`` resumes exactly.

    On resume it puts the random state back when the fit starts (the next draw is the first draw of the
    next epoch, as in a run that never stopped) and, when the run continues in its own folder, writes
    back the rows of ``metrics.csv`` logged up to the checkpoint (Lightning's CSV logger starts the file
    anew; rows logged after the checkpoint are logged again by the resumed run).
    """

    def __init__(self) -> None:
        # The newest epoch's checkpoint under one name (what Lightning's own ``ckpt_path="last"`` looks for).
        super().__init__(filename=LAST_CHECKPOINT, monitor=None, save_top_k=1, save_on_train_epoch_end=True,
                         enable_version_counter=False)
        self._resumed_random_state: dict[str, Any] | None = None
        self._rows_to_replay: list[dict[str, str]] = []

    @property
    def state_key(self) -> str:
        return "ResumeCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "random_state": random_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "random_state"})
        self._resumed_random_state = state_dict.get("random_state")

    def keep_rows(self, metrics_csv: Path, checkpoint: dict) -> None:
        """Before a resumed fit in its own folder (whose CSV logger will start ``metrics.csv`` anew): keep the
        rows logged up to the checkpoint (below its step counter), to write them back when training starts."""
        steps = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        stepped = steps.get("_batches_that_stepped")
        if stepped is None or not metrics_csv.is_file():
            return
        with metrics_csv.open() as fh:
            self._rows_to_replay = [row for row in csv.DictReader(fh) if row.get("step") and int(row["step"]) < stepped]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed_random_state is not None:
            set_random_state(self._resumed_random_state)
            self._resumed_random_state = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for row in self._rows_to_replay:
            values = {k: int(v) if v.lstrip("-").isdigit() else float(v)
                      for k, v in row.items() if k != "step" and v not in ("", None)}
            for logger in trainer.loggers:
                if type(logger).__name__ == "CSVLogger":
                    logger.log_metrics(values, step=int(row["step"]))
        self._rows_to_replay = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:  # the rows up to this checkpoint reach disk before it is written
            logger.save()
        super().on_train_epoch_end(trainer, pl_module)


class FitSummary(L.Callback):
    """Ends ``recpost fit`` with where the best checkpoint is and its score, and the resume point."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best = next((cb for cb in trainer.checkpoint_callbacks
                     if isinstance(cb, ModelCheckpoint) and not isinstance(cb, ResumeCheckpoint)), None)
        if best is not None and best.best_model_path:
            score = best.best_model_score
            shown = f"{best.monitor} = {float(score):.4f}" if score is not None and best.monitor else "no score"
            print(f"best checkpoint ({shown}): {best.best_model_path}", flush=True)
        elif best is not None:
            print(f"no best checkpoint: {best.monitor} was never logged (did validation run?)", flush=True)
        last = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ResumeCheckpoint)), None)
        if last is not None and last.best_model_path:
            print(f"resume point: {last.best_model_path} (recpost fit ... --ckpt_path last)", flush=True)


class ElapsedTime(L.Callback):
    """Logs ``time/elapsed_seconds`` (wall time since the fit started) at each validation, so
    ``metrics.csv`` holds the curve a user waits through: validation quality against wall seconds.

    The time includes training, validation and checkpointing, not process start-up or data caching.
    """

    def __init__(self) -> None:
        self.start: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is not None and not trainer.sanity_checking:
            pl_module.log("time/elapsed_seconds", time.perf_counter() - self.start, sync_dist=False)
