"""Simulator generation speed: 10^5, 10^6 and 10^7 interactions.

    pytest -m benchmark -s tests/benchmarks/bench_simulator.py

Prints ``name: value`` lines (seconds, rows). The small world scores the whole catalog at every step
(exact); the two large ones expose each user to ``candidates`` items, which keeps the cost at
``interactions x candidates`` whatever the catalog size (see ``recpost/data/simulator/``).
"""

from __future__ import annotations

import time

import pytest

from recpost.data import Simulator
from recpost.data.simulator import WorldConfig

SCENARIOS = {
    # name: (users, items, min_seq_len, max_seq_len, candidates) -> ~users * (min + max) / 2 rows
    "1e5": (2_000, 10_000, 25, 75, None),
    "1e6": (20_000, 100_000, 25, 75, 1_000),
    "1e7": (100_000, 1_000_000, 50, 150, 1_000),
}


@pytest.mark.benchmark
@pytest.mark.parametrize("scale", list(SCENARIOS))
def test_simulator_generation_time(scale: str) -> None:
    users, items, lo, hi, candidates = SCENARIOS[scale]
    sim = Simulator(WorldConfig(n_users=users, n_items=items, candidates=candidates, seed=0), min_seq_len=lo, max_seq_len=hi)
    start = time.perf_counter()
    table = sim.load()
    seconds = time.perf_counter() - start
    print(f"\nsim_generate_{scale}_rows: {table.num_rows}")
    print(f"sim_generate_{scale}_items: {items}")
    print(f"sim_generate_{scale}_candidates: {candidates or items}")
    print(f"sim_generate_{scale}_seconds: {seconds:.2f}")
    print(f"sim_generate_{scale}_rows_per_second: {table.num_rows / seconds:.0f}")
    assert table.num_rows > 0
