"""Seconds per pretraining epoch on ML-1M (users 1-2,999) for SASRec, HSTU and HSTU-large at their
published ML-1M sizes, with the training settings of ``configs/recipe/fast.yaml`` (batches of 64 windows
grouped by length, targets weighted alike), and each one's ratio to SASRec measured in the same run.

    pytest -m benchmark -s tests/benchmarks/bench_backbone_sizes.py

``recpost bench`` times HSTU against SASRec at one equal size (``step_time_ratio/hstu_vs_sasrec``);
this times the three models the issue-12 quality table compares, each at its own size. Each backbone
trains ``EPOCHS`` epochs (one validation of the 2,999 users after each) and the figure is the median.
Needs ``$RECPOST_DATA_DIR/ml-1m-users1-2999``.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from recpost.bench.steps import epoch_seconds
from recpost.data import MovieLens, RecDataModule
from recpost.data.sources import default_data_root
from recpost.methods import SFT
from recpost.models import BackboneConfig

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 2
SIZES = ("sasrec", "hstu", "hstu_large")  # configs/backbone/<name>.yaml define each size, so the benchmark follows them


def _backbone(name: str) -> BackboneConfig:
    settings = yaml.safe_load((ROOT / "configs" / "backbone" / f"{name}.yaml").read_text())["model"]["init_args"]["backbone"]
    return BackboneConfig(**settings)


@pytest.mark.benchmark
def test_epoch_seconds_per_backbone_size_on_ml1m() -> None:
    root = default_data_root() / "ml-1m-users1-2999"
    if not root.is_dir():
        pytest.skip(f"ML-1M (users 1-2,999) not found at {root}")
    torch.set_num_threads(os.cpu_count() or 1)  # as a fit runs (the test session pins 1 thread)
    # Not recpost.bench.steps.datamodule: that one validates in batches of 128 users, the recipe in 64.
    dm = RecDataModule(MovieLens("1m", root=str(root), download=False), max_len=200, batch_size=64,
                       eval_batch_size=64, length_grouping=16)
    seconds: dict[str, float] = {}
    for name in SIZES:
        torch.manual_seed(0)
        module = SFT(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=200, backbone=_backbone(name),
                     target_norm="dataset", lr=3e-3)
        timer = epoch_seconds(module, dm, EPOCHS)
        seconds[name] = statistics.median(timer.with_val)
        print(f"pretrain/epoch_seconds_with_val/{name}: {seconds[name]:.1f} "
              f"(training {statistics.median(timer.train):.1f}, validation {statistics.median(timer.val):.1f})")
    for name in ("hstu", "hstu_large"):
        print(f"epoch_time_ratio/{name}_vs_sasrec: {seconds[name] / seconds['sasrec']:.2f}")
