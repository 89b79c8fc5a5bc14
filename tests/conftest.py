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


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """`write_tiny_config` in the test's temporary folder (runs go to ``<tmp_path>/runs``)."""
    from tests.helpers import write_tiny_config

    return write_tiny_config(tmp_path)


@pytest.fixture
def rlhf_setup(tmp_path: Path):
    """(datamodule, pretrained checkpoint, reward-model checkpoint) on tiny data, for PPO/DPO tests."""
    from tests.helpers import pretrained_checkpoint, reward_model_checkpoint, tiny_datamodule

    dm = tiny_datamodule(tmp_path)
    return dm, pretrained_checkpoint(dm, tmp_path / "pre.ckpt"), reward_model_checkpoint(dm, tmp_path / "rm.ckpt")
