"""Test setup: real data from ../shared/data when present, a private cache, W&B offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

if SHARED_DATA.is_dir() and "RECPOST_DATA_DIR" not in os.environ:
    os.environ["RECPOST_DATA_DIR"] = str(SHARED_DATA)
os.environ.setdefault("WANDB_MODE", "offline")
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
