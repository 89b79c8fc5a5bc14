"""Tiny modules and checkpoints shared by the reward-model, PPO and DPO tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from recpost.data import RecDataModule, Table
from recpost.methods import SFT, RewardModel
from recpost.models import BackboneConfig
from tests.conftest import write_tiny_interactions

TINY = BackboneConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.1)


def tiny_datamodule(tmp_path: Path, **kw) -> RecDataModule:
    tmp_path.mkdir(parents=True, exist_ok=True)
    csv = write_tiny_interactions(tmp_path / "tiny.csv", **kw)
    return RecDataModule(Table(str(csv), name="tiny"), max_len=8, batch_size=64, cache_dir=str(tmp_path / "cache"))


def build(cls, dm: RecDataModule, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=dm.max_len, backbone=TINY, **kw)


def save_checkpoint(module, path: Path) -> Path:
    """What Lightning's checkpoint holds for ``init_from`` / ``reward_model``: weights and hyperparameters."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def pretrained_checkpoint(dm: RecDataModule, path: Path) -> Path:
    return save_checkpoint(build(SFT, dm), path)


def reward_model_checkpoint(dm: RecDataModule, path: Path, steps: int = 3, seed: int = 0) -> Path:
    """A RewardModel started at the baseline predictor and trained a few steps on the tiny data."""
    rm = build(RewardModel, dm, seed=seed)
    d = dm.data
    rm.init_biases_from(d.item, d.rating, d.offsets)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2)
    for i in range(steps):
        loss, _ = rm.training_loss(dm._collate_train(list(range(32 * i, 32 * i + 32))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(rm, path)


def recpost(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "recpost", *args], capture_output=True, text=True, env=env, timeout=300)


def last_metrics(run_root: Path) -> tuple[Path, list[dict[str, str]]]:
    """The newest run folder under ``run_root`` and the rows of its metrics.csv."""
    import csv

    run = sorted((run_root / "lightning_logs").glob("version_*"))[-1]
    with (run / "metrics.csv").open() as fh:
        return run, list(csv.DictReader(fh))
