"""Blockwise full-softmax cross-entropy (``Backbone.cross_entropy``) against ``F.cross_entropy`` over the
materialised ``[targets, items + 1]`` logits, and the fused loss that SFT's ``training_loss`` uses
(``Backbone.weighted_cross_entropy``: gradients computed in the forward): SFT training steps (forward,
backward, Adam) on the same batches, alternated in one process, ratios of the best of 3 repetitions.

    pytest -m benchmark -s tests/benchmarks/bench_cross_entropy.py

ML-100K (batch 128, plain batches) and, when present, ML-1M (users 1-2,999) with configs/recipe/fast.yaml's
batches (64, length-grouped); SASRec d 50, 2 blocks, max_len 200. Needs ``$RECPOST_DATA_DIR``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recpost.data import MovieLens, RecDataModule
from recpost.methods import SFT
from recpost.models import BackboneConfig


def _datamodule(dataset: str) -> RecDataModule:
    if dataset == "ml100k":
        return RecDataModule(MovieLens("100k", download=False), max_len=200, batch_size=128)
    root = Path(os.environ.get("RECPOST_DATA_DIR", "")) / "ml-1m-users1-2999"
    if not root.exists():
        pytest.skip(f"no ML-1M (users 1-2,999) at {root}")
    return RecDataModule(MovieLens("1m", root=str(root), download=False), max_len=200, batch_size=64, length_grouping=16)


@pytest.mark.benchmark
@pytest.mark.parametrize("dataset", ["ml100k", "ml1m"])
def test_blockwise_against_materialised_cross_entropy(ml100k_root, dataset: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))  # the session pins 1
    dm = _datamodule(dataset)
    dm.setup("fit")
    torch.manual_seed(0)
    batches = [b for _, b in zip(range(8), dm.train_dataloader())]
    model = SFT(n_items=dm.n_items, max_len=200, lr=3e-3, backbone=BackboneConfig(
        name="sasrec", d_model=50, n_layers=2, n_heads=1, dropout=0.2, ff_mult=1, activation="relu"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    blockwise = model.backbone.cross_entropy

    def materialised(hidden, targets):
        return F.cross_entropy(model.backbone.score(hidden), targets, reduction="none")

    def per_target_loss(b):
        ce, _ = model.next_item_cross_entropy(b)
        return ce.mean()

    def fused_loss(b):
        return model.training_loss(b)[0]

    seconds = {"blockwise": [], "materialised": [], "fused": []}
    for _ in range(3):
        for label, loss_fn, loss in (("materialised", materialised, per_target_loss),
                                     ("blockwise", blockwise, per_target_loss), ("fused", blockwise, fused_loss)):
            model.backbone.cross_entropy = loss_fn
            start = time.perf_counter()
            for b in batches:
                opt.zero_grad()
                loss(b).backward()
                opt.step()
            seconds[label].append(time.perf_counter() - start)
    for label, values in seconds.items():
        print(f"{dataset}/seconds_8_steps/{label}: {min(values):.2f}")
    best = {label: min(values) for label, values in seconds.items()}
    print(f"{dataset}/step_time_ratio/blockwise_vs_materialised: {best['blockwise'] / best['materialised']:.2f}")
    print(f"{dataset}/step_time_ratio/fused_vs_blockwise: {best['fused'] / best['blockwise']:.2f}")
