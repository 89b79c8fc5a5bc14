"""Where a training step of SFT, PPO and DPO spends its time: ``torch.profiler`` tables (top ops by self CPU time).

    pytest -m benchmark -s tests/benchmarks/bench_profile.py

One step of each method on an ML-100K batch (``recpost bench``'s setup: SASRec d 64, 2 layers, max_len 200,
128 windows, each method's shipped defaults), after one unprofiled warm-up step. Needs ML-100K under
``$RECPOST_DATA_DIR``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from recpost.bench.steps import datamodule, method_steps
from recpost.models import BackboneConfig


@pytest.mark.benchmark
def test_profile_one_step_of_sft_ppo_and_dpo(ml100k_root) -> None:
    torch.set_num_threads(os.cpu_count() or 1)  # as `recpost bench` runs (the test session pins 1 thread)
    torch.manual_seed(0)
    dm = datamodule("ml100k", 200, 128, 0, 0)
    common = dict(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=200,
                  backbone=BackboneConfig(d_model=64, n_layers=2))
    steps = method_steps(dm, common, "cpu", names=["sft", "ppo", "dpo"])
    batch = next(iter(dm.train_dataloader()))
    for name, step in steps.items():
        step(batch, 0)  # warm-up: allocator and caches
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batch, 1)
        print(f"=== {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
