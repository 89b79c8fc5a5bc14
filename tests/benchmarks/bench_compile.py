"""``backbone.compile`` against eager: seconds per ML-100K training epoch (forward and backward of SFT's loss),
and the loss difference on one batch, for SASRec and HSTU.

    pytest -m benchmark -s tests/benchmarks/bench_compile.py

Length-grouped batches (pools of 16), d 64, 2 layers, max_len 200, dropout 0 (with dropout the compiled
masks come from inductor's generator, so losses are not comparable bit for bit). The first compiled
epoch includes compiling (dynamic shapes: a few recompiles for new lengths); the figure that matters is
the steady epochs. Needs ML-100K under ``$RECPOST_DATA_DIR``.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from recpost.data import MovieLens, RecDataModule
from recpost.methods import SFT
from recpost.models import BackboneConfig


@pytest.mark.benchmark
@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_compiled_backbone_epoch_time(ml100k_root, name: str) -> None:
    torch.set_num_threads(os.cpu_count() or 1)  # as a fit runs (the test session pins 1 thread)
    dm = RecDataModule(MovieLens("100k", download=False), max_len=200, batch_size=128, length_grouping=16)
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())

    def model(compile: bool) -> SFT:
        torch.manual_seed(0)
        return SFT(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=200,
                   backbone=BackboneConfig(name=name, d_model=64, n_layers=2, dropout=0.0, compile=compile))

    eager, compiled = model(False), model(True)
    start = time.perf_counter()
    compiled.training_loss(batches[0])[0].backward()
    print(f"{name}/compile_and_first_step_seconds: {time.perf_counter() - start:.1f}")
    print(f"{name}/loss_difference: {(eager.training_loss(batches[1])[0] - compiled.training_loss(batches[1])[0]).abs().item():.3g}")
    for repetition in range(3):
        for label, m in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            for b in batches:
                m.zero_grad()
                m.training_loss(b)[0].backward()
            print(f"{name}/epoch_seconds/{label}/{repetition}: {time.perf_counter() - start:.2f}")
