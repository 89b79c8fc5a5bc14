"""Where each post-training run of a study started and ended on validation (not what selection kept).

    python docs/results/curves.py runs/experiments/sim [val/true_reward@10]

For each stage's fit (its last run folder, when a stage was resumed) it prints the optimiser steps, the
study's monitor (``val/ndcg@10``) and a second validation metric (by default ``val/true_reward@10``, the
simulator's true reward of the top 10) at the first validation (before any update) and at the last one.
A results table shows the checkpoint that selection kept; this shows where training went.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def main(study: Path, second: str = "val/true_reward@10", monitor: str = "val/ndcg@10") -> None:
    print(f"{'stage':<44} {'steps':>5} {monitor + ' start':>18} {'last':>7} {second + ' start':>25} {'last':>7}")
    for fit in sorted(study.glob("seed*/*/*/fit")):
        runs = sorted(fit.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
        if not runs:
            continue
        with runs[-1].open() as fh:
            rows = [r for r in csv.DictReader(fh) if r.get(monitor)]
        if not rows:
            continue
        first, last = rows[0], rows[-1]
        steps = float(last.get("time/optimizer_steps") or "nan")
        cells = [float(r.get(k) or "nan") for r in (first, last) for k in (monitor, second)]
        print(f"{str(fit.parent.relative_to(study)):<44} {steps:>5.0f} {cells[0]:>18.4f} {cells[2]:>7.4f} "
              f"{cells[1]:>25.4f} {cells[3]:>7.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
