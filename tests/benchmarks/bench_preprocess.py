"""Preprocessing speed at data scale: 10^6 and 10^7 simulated interactions, and MovieLens-100K.

    pytest -m benchmark -s tests/benchmarks/bench_preprocess.py

Prints ``name: value`` lines. Each case starts from a cold (empty) cache and times separately:

- ``load_seconds``: the source producing its raw table (for the simulator: generating the world and
  its sequences, as in ``bench_simulator.py``; for MovieLens: parsing ``u.data``);
- ``preprocess_seconds``: ``build_cache`` from that table: validation, deduplication, id remapping,
  chronological sort and writing the Arrow cache (what every source pays on first use);
- ``open_seconds``: opening the finished cache (memory-mapped) as a DataModule does on every later run.

``build_cache`` itself calls ``source.load()`` and then preprocesses; the benchmark hands it the table
already loaded (same name and fingerprint) so that the two parts are timed apart.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pytest

from recpost.data import MovieLens, Simulator, Source
from recpost.data.cache import build_cache, load_cache
from recpost.data.interactions import PreprocessOptions
from recpost.data.simulator import WorldConfig

# name: (users, items, min_seq_len, max_seq_len, candidates) -> ~users * (min + max) / 2 interactions
# (the large-catalog options of bench_simulator.py)
SIMULATED = {
    "1e6": (20_000, 100_000, 25, 75, 1_000),
    "1e7": (100_000, 1_000_000, 50, 150, 1_000),
}


class _Loaded(Source):
    """A source whose raw table is already in memory: ``build_cache`` then times preprocessing only."""

    def __init__(self, source: Source, table: pa.Table) -> None:
        self.source, self.table = source, table
        self.rating_range = source.rating_range

    @property
    def name(self) -> str:
        return self.source.name

    def fingerprint(self) -> dict:
        return self.source.fingerprint()

    def load(self) -> pa.Table:
        return self.table


def _time_preprocessing(label: str, source: Source, cache_dir: Path) -> None:
    start = time.perf_counter()
    table = source.load()
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    path = build_cache(_Loaded(source, table), PreprocessOptions(), cache_dir)
    preprocess_seconds = time.perf_counter() - start

    start = time.perf_counter()
    data = load_cache(path)
    open_seconds = time.perf_counter() - start

    print(f"\npreprocess_{label}_raw_rows: {table.num_rows}")
    print(f"preprocess_{label}_rows: {len(data.item)}")
    print(f"preprocess_{label}_users: {data.n_users}")
    print(f"preprocess_{label}_items: {data.n_items}")
    print(f"preprocess_{label}_load_seconds: {load_seconds:.2f}")
    print(f"preprocess_{label}_preprocess_seconds: {preprocess_seconds:.2f}")
    print(f"preprocess_{label}_total_seconds: {load_seconds + preprocess_seconds:.2f}")
    print(f"preprocess_{label}_preprocess_rows_per_second: {table.num_rows / preprocess_seconds:.0f}")
    print(f"preprocess_{label}_open_seconds: {open_seconds:.3f}")
    assert len(data.item) > 0 and data.offsets[-1] == len(data.item)


@pytest.mark.benchmark
@pytest.mark.parametrize("scale", list(SIMULATED))
def test_simulator_preprocess_time(scale: str, tmp_path: Path) -> None:
    users, items, lo, hi, candidates = SIMULATED[scale]
    sim = Simulator(WorldConfig(n_users=users, n_items=items, candidates=candidates, seed=0), min_seq_len=lo, max_seq_len=hi)
    _time_preprocessing(f"sim_{scale}", sim, tmp_path / "cache")


@pytest.mark.benchmark
def test_movielens_100k_preprocess_time(ml100k_root: Path, tmp_path: Path) -> None:
    _time_preprocessing("ml100k", MovieLens("100k", root=str(ml100k_root), download=False), tmp_path / "cache")
