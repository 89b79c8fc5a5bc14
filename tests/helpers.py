"""What the tests share: tiny data and configs, tiny modules and checkpoints, running the real CLI,
finding run folders. Test files import from here, never from each other."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from recpost.checkpoint import save_checkpoint
from recpost.data import RecDataModule, Table
from recpost.methods import SFT, RewardModel
from recpost.models import BackboneConfig
from recpost.runs import RunFolder, latest_run

__all__ = [
    "TINY_BACKBONE", "TINY_CONFIG", "RunFolder", "assert_same_loss_and_gradients", "build", "init_reward_biases", "last_metrics", "latest_run",
    "metrics_rows", "pretrained_checkpoint",
    "recpost", "reward_model_checkpoint", "save_checkpoint", "tiny_datamodule", "write_tiny_config",
    "write_tiny_interactions",
]

TINY_BACKBONE = BackboneConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.1)


# ----------------------------------------------------------------------------------- tiny data and configs
def write_tiny_interactions(path: Path, n_users: int = 101, n_items: int = 40, seed: int = 0) -> Path:
    """A small ratings CSV (user_id,item_id,rating,timestamp) with 6-14 interactions per user."""
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,rating,timestamp"]
    for u in range(n_users):
        items = rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(6, 15)), replace=False)
        for t, i in enumerate(items):
            lines.append(f"u{u},i{i},{int(rng.integers(1, 6))},{1000 + 10 * t}")
    path.write_text("\n".join(lines) + "\n")
    return path


TINY_CONFIG = """
seed_everything: 0
data:
  source:
    class_path: recpost.data.Table
    init_args:
      path: {csv}
      name: tiny
  max_len: 8
  batch_size: 32
  eval_batch_size: 16
model:
  class_path: recpost.methods.SFT
  init_args:
    backbone:
      d_model: 16
      n_layers: 1
      n_heads: 2
      dropout: 0.1
    lr: 0.01
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: {max_epochs}
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  default_root_dir: {root}
"""


def write_tiny_config(folder: Path, max_epochs: int = 2) -> Path:
    """A complete `recpost fit` config on a tiny CSV: 101 users (uneven over 2 ranks), 40 items; runs go
    to ``<folder>/runs``."""
    data = write_tiny_interactions(folder / "tiny.csv")
    cfg = folder / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(csv=data, max_epochs=max_epochs, root=folder / "runs"))
    return cfg


def tiny_datamodule(tmp_path: Path, **kw) -> RecDataModule:
    """A DataModule on `write_tiny_interactions` data (max_len 8, 64 windows per batch)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_tiny_interactions(tmp_path / "tiny.csv", **kw)
    return RecDataModule(Table(str(data), name="tiny"), max_len=8, batch_size=64, cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------- tiny modules and checkpoints
def build(cls, dm: RecDataModule, seed: int = 0, **kw):
    """A method module of class ``cls`` for ``dm``'s catalog with the tiny backbone, seeded."""
    torch.manual_seed(seed)
    return cls(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=dm.max_len, backbone=TINY_BACKBONE, **kw)


def init_reward_biases(rm: RewardModel, dm: RecDataModule) -> RewardModel:
    """Start ``rm``'s head at the baseline predictor of ``dm``'s training ratings (what fit does first)."""
    train = dm.training_interactions()
    rm.init_biases(train.item, train.rating, train.weight)
    return rm


def pretrained_checkpoint(dm: RecDataModule, path: Path) -> Path:
    return save_checkpoint(build(SFT, dm), path)


def reward_model_checkpoint(dm: RecDataModule, path: Path, steps: int = 3, seed: int = 0) -> Path:
    """A RewardModel started at the baseline predictor and trained a few steps on the tiny data."""
    rm = build(RewardModel, dm, seed=seed)
    init_reward_biases(rm, dm)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2)
    for i in range(steps):
        loss, _ = rm.training_loss(dm.train_batch(list(range(32 * i, 32 * i + 32))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(rm, path)


# ----------------------------------------------------------------------------------- the real CLI
def recpost(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m recpost <args>`` in a subprocess; returns the completed process (output captured)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "recpost", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def metrics_rows(run: RunFolder) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv."""
    with run.metrics_csv.open() as fh:
        return list(csv.DictReader(fh))


def last_metrics(root: Path) -> tuple[RunFolder, list[dict[str, str]]]:
    """The newest run under ``root`` (a ``default_root_dir``) and the rows of its metrics.csv."""
    run = latest_run(root)
    return run, metrics_rows(run)


# ----------------------------------------------------------------------------------- assertions
def assert_same_loss_and_gradients(first, second, batch, seed: int | None = None) -> None:
    """Both modules give the same loss and parameter gradients on ``batch`` (``seed``: the same random
    draws, e.g. sampled negatives, for both)."""
    results = []
    for module in (first, second):
        if seed is not None:
            torch.manual_seed(seed)
        loss, _ = module.training_loss(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    for g_a, g_b in zip(grads_a, grads_b):
        assert torch.allclose(g_a, g_b, rtol=1e-5, atol=1e-8)
