"""Test setup: real data from ../shared/data when present, a private cache, W&B offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

if SHARED_DATA.is_dir() and "RECPOST_DATA_DIR" not in os.environ:
    os.environ["RECPOST_DATA_DIR"] = str(SHARED_DATA)
os.environ.setdefault("WANDB_MODE", "offline")
# In-process tests use tiny tensors, where 2 OpenMP threads on a loaded 2-core machine spin-wait
# (measured 13x slower); CLI subprocesses keep torch's default.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test session preprocesses into its own cache, so tests never see a stale one."""
    os.environ["RECPOST_CACHE_DIR"] = str(tmp_path_factory.mktemp("recpost-cache"))


@pytest.fixture
def ml100k_root() -> Path:
    """The real MovieLens-100K folder's parent; skips where ../shared/data is absent."""
    root = Path(os.environ.get("RECPOST_DATA_DIR", SHARED_DATA))
    if not (root / "ml-100k" / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {root}/ml-100k/u.data (../shared/data is absent on this machine)")
    return root


def write_tiny_interactions(path: Path, n_users: int = 101, n_items: int = 40, seed: int = 0) -> Path:
    """A small ratings CSV (user_id,item_id,rating,timestamp) with 6-14 interactions per user."""
    import numpy as np

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
    """A complete `recpost fit` config on a tiny CSV: 101 users (uneven over 2 ranks), 40 items."""
    csv = write_tiny_interactions(folder / "tiny.csv")
    cfg = folder / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(csv=csv, max_epochs=max_epochs, root=folder / "runs"))
    return cfg


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """`write_tiny_config` in the test's temporary folder (runs go to ``<tmp_path>/runs``)."""
    return write_tiny_config(tmp_path)


@pytest.fixture
def rlhf_setup(tmp_path: Path):
    """(datamodule, pretrained checkpoint, reward-model checkpoint) on tiny data, for PPO/DPO tests."""
    from tests.policy_helpers import pretrained_checkpoint, reward_model_checkpoint, tiny_datamodule

    dm = tiny_datamodule(tmp_path)
    return dm, pretrained_checkpoint(dm, tmp_path / "pre.ckpt"), reward_model_checkpoint(dm, tmp_path / "rm.ckpt")
