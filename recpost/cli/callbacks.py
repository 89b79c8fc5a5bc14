"""Lightning callbacks every ``recpost fit`` gets: ``last.ckpt`` beside ``best.ckpt`` for an exact
resume, the closing line that names both, the elapsed wall time and optimiser steps at each validation, and
which points are candidates for ``best.ckpt`` (:class:`BestCheckpoint`, :class:`ValidationSchedule`: the
starting weights, every N optimiser steps).

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
import math
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from recpost.core.errors import RecpostError
from recpost.core.runs import LAST_CHECKPOINT

# Logged at each validation of a fit: the optimiser steps taken before it (0: the starting weights).
OPTIMIZER_STEPS = "time/optimizer_steps"


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
    """Logs ``time/elapsed_seconds`` (wall time since the fit started) and ``time/optimizer_steps`` (optimiser
    steps taken) at each validation, so ``metrics.csv`` holds the curve a user waits through (validation
    quality against wall seconds) and the step of each candidate for ``best.ckpt`` (Lightning's ``step``
    column counts training batches, several optimiser steps each for PPO).

    The time includes training, validation and checkpointing, not process start-up or data caching.
    """

    def __init__(self) -> None:
        self.start: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is not None and not trainer.sanity_checking:
            pl_module.log("time/elapsed_seconds", time.perf_counter() - self.start, sync_dist=False)
            pl_module.log(OPTIMIZER_STEPS, float(trainer.global_step), sync_dist=False)


def _fitting(trainer: L.Trainer) -> bool:
    """A real validation of ``fit`` (not the sanity check, not ``validate``, not ``fast_dev_run``)."""
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run


class BestCheckpoint(ModelCheckpoint):
    """``checkpoints/best.ckpt`` (``--checkpoint.*``): Lightning's ``ModelCheckpoint``, with the starting weights
    as a candidate.

    Lightning never saves before the first optimiser step ("no steps were taken"), so a post-training run
    that only gets worse would still hand its least-bad degraded weights on as the best. Here a validation at
    step 0 (:class:`ValidationSchedule`'s, before the first update) is saved like any other: when no later
    validation beats it, ``best.ckpt`` holds the starting weights. A tie keeps the earlier checkpoint (Lightning
    replaces the best only on a strict improvement), so the starting policy wins ties.
    """

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: a run saved before this class existed resumes with its best score.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and _fitting(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_validation_end(trainer, pl_module)


class ValidationSchedule(L.Callback):
    """When a fit validates (``--validation.*``): the candidates for ``best.ckpt``.

    Args:
        at_start: validate before the first update, so that the starting weights are a candidate
            (:class:`BestCheckpoint` keeps them when nothing later beats them) and ``metrics.csv`` starts at
            step 0. ``null``: when the model starts from ``init_from`` weights (post-training), not for a model
            trained from scratch. A resumed fit (``--ckpt_path``) does not validate its start again.
        every_n_steps: validate every this many optimiser steps, counted over the whole run, and after the
            last update, instead of once per epoch (``null``). A method that takes several optimiser steps per
            training batch (PPO: ``ppo_epochs x num_minibatches`` per rollout) validates after the batch that
            reaches the count: every ``ceil(every_n_steps / steps per batch)`` batches. Preference and RL methods
            can peak within an epoch; frequent validation keeps that point a candidate.
    """

    def __init__(self, at_start: bool | None = None, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise RecpostError(f"validation.every_n_steps must be an integer >= 1 or null (got {every_n_steps!r})")
        self.at_start = at_start
        self.every_n_steps = every_n_steps
        self._validated_at: int | None = None  # optimiser steps at the last validation of this fit

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.every_n_steps is None:
            return
        if trainer.val_check_interval != 1.0 or trainer.check_val_every_n_epoch != 1:
            raise RecpostError("validation.every_n_steps replaces trainer.val_check_interval and "
                               "trainer.check_val_every_n_epoch; give one or the other")
        # Lightning's own schedule, in training batches counted over the run (not per epoch).
        steps_per_batch = pl_module.optimizer_steps_per_batch() if hasattr(pl_module, "optimizer_steps_per_batch") else 1
        trainer.val_check_interval = max(1, math.ceil(self.every_n_steps / steps_per_batch))
        trainer.check_val_every_n_epoch = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated_at = None
        at_start = self.at_start if self.at_start is not None else bool(pl_module.hparams.get("init_from"))
        if at_start and trainer.global_step == 0:
            self._validate(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _fitting(trainer):
            self._validated_at = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is not None and self._validated_at != trainer.global_step:
            self._validate(trainer)  # the final weights are a candidate too

    @staticmethod
    def _validate(trainer: L.Trainer) -> None:
        """Run the fit's validation loop now, as Lightning does between training batches (the same loop,
        logger and checkpoint callbacks; the trainer back in training state after)."""
        if not trainer.enable_validation:
            return
        connector = trainer._logger_connector
        first_loop_iter = connector._first_loop_iter
        trainer.validating = True
        try:
            trainer.fit_loop.epoch_loop.val_loop.run()
        finally:
            trainer.training = True
            connector._first_loop_iter = first_loop_iter
