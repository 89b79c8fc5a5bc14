"""``recpost bench``: speed figures, one ``name: value`` line each, measured in one run.

Absolute times drift on shared machines, so method costs are reported as ratios of step times
measured interleaved on the same batches (ExpSFT / SFT), next to the absolute figures.
"""

from __future__ import annotations

import statistics
import time
from typing import Literal

import lightning as L
import torch

from recpost.data import MovieLens, RecDataModule
from recpost.methods import SFT, ExpSFT
from recpost.models import BackboneConfig


class _Timer(L.Callback):
    """Wall time of each training epoch (without validation) and of each validation loop."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train.append(time.perf_counter() - self._t)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._v = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val.append(time.perf_counter() - self._v)


def _datamodule(dataset: str, max_len: int, batch_size: int) -> RecDataModule:
    if dataset == "ml100k":
        source = MovieLens("100k", download=False)
    else:
        from recpost.data import Simulator

        source = Simulator()
    return RecDataModule(source, max_len=max_len, batch_size=batch_size, eval_batch_size=1024)


def _step_seconds(module, batch, opt) -> float:
    t = time.perf_counter()
    loss, _ = module.training_loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def bench(
    dataset: Literal["ml100k", "sim"] = "ml100k",
    epochs: int = 3,
    steps: int = 20,
    max_len: int = 200,
    batch_size: int = 128,
    d_model: int = 64,
    n_layers: int = 2,
) -> dict[str, float]:
    """Measure and print pretraining epoch time, evaluation throughput and method step-time ratios.

    Args:
        dataset: ``ml100k`` (needs MovieLens-100K under $RECPOST_DATA_DIR) or ``sim`` (simulator).
        epochs: training epochs to time (each followed by a full validation).
        steps: interleaved training steps per method for the step-time ratios.
        max_len: history length.
        batch_size: training windows per batch.
        d_model: SASRec width.
        n_layers: SASRec depth.
    """
    torch.manual_seed(0)
    dm = _datamodule(dataset, max_len, batch_size)
    backbone = BackboneConfig(d_model=d_model, n_layers=n_layers)
    common = dict(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=max_len, backbone=backbone)
    figures: dict[str, float] = {"threads": float(torch.get_num_threads())}

    timer = _Timer()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )
    trainer.fit(SFT(**common), datamodule=dm)
    figures["pretrain/epoch_seconds"] = statistics.median(timer.train)
    figures["pretrain/windows_per_second"] = len(dm.train_windows()[0]) / figures["pretrain/epoch_seconds"]
    figures["eval/seconds_all_users"] = statistics.median(timer.val)
    figures["eval/users_per_second"] = dm.data.n_users / figures["eval/seconds_all_users"]

    # Interleaved steps on the same batches: the ratio cancels machine load that drifts over time.
    modules = {"sft": SFT(**common), "exp_sft": ExpSFT(**common, lam=1.0)}
    for m in modules.values():
        m.train()
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in modules.items()}
    loader = iter(dm.train_dataloader())
    times: dict[str, list[float]] = {k: [] for k in modules}
    for i in range(steps + 2):
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(dm.train_dataloader())
            batch = next(loader)
        for name in (list(modules) if i % 2 == 0 else list(reversed(modules))):
            t = _step_seconds(modules[name], batch, opts[name])
            if i >= 2:  # first steps warm up allocators
                times[name].append(t)
    figures["step_seconds/sft"] = statistics.median(times["sft"])
    figures["step_seconds/exp_sft"] = statistics.median(times["exp_sft"])
    ratios = [e / s for e, s in zip(times["exp_sft"], times["sft"])]
    figures["step_time_ratio/exp_sft_vs_sft"] = statistics.median(ratios)
    for name, value in figures.items():
        print(f"{name}: {value:.4g}")
    return figures
