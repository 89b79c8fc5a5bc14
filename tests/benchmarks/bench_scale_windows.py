"""Memory of one DDP rank's training windows, before and after ``data.per_rank_windows`` (docs/scale/costs.md).

    RECPOST_DATA_DIR=/tmp/scale python -m tests.benchmarks.bench_scale_windows --shape ml20m --cache /tmp/scale/.bench-cache/ml20m

On the cached data of a synthetic shape (``recpost bench --dataset synthetic`` builds it), for ``train_samples``
``windows`` and ``prefixes`` and 8 ranks: the windows one rank holds, and the peak of numpy allocations
(``tracemalloc``) while it builds them, with every rank building every window (``per_rank_windows: false``, what
Lightning's distributed sampler then picks from) and with each rank building only its own; then the peak of what
every rank still computes over the whole data (``whole_data/...``: item counts for the popularity sampler, the
training interactions of the reward model's initialisation, the target rewards). Prints ``name: value``.
"""

from __future__ import annotations

import argparse
import tracemalloc
from types import SimpleNamespace

from recpost.bench.scale_stages import datamodule

RANKS = 8


def rank_windows_memory(shape: str, cache: str) -> dict[str, float]:
    out = {}
    for samples in ("windows", "prefixes"):
        for per_rank in (False, True):
            dm = datamodule({"shape": shape, "cache_dir": cache})
            dm.train_samples, dm.per_rank_windows = samples, per_rank
            dm.trainer = SimpleNamespace(world_size=RANKS, global_rank=0)  # rank 0 of 8, as Lightning attaches it
            dm.data  # opened (memory-mapped) before measuring
            tracemalloc.start()
            w_start, w_end = dm.train_windows()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            tag = f"{samples}/{'per_rank' if per_rank else 'every_window'}"
            out[f"{tag}/rank_windows"] = float(len(w_start))
            out[f"{tag}/rank_windows_mib"] = (w_start.nbytes + w_end.nbytes) / 2**20
            out[f"{tag}/build_peak_mib"] = peak / 2**20
    for name in ("train_item_counts", "training_interactions", "train_target_rewards"):  # over every user, each rank
        tracemalloc.start()
        getattr(dm, name)()
        out[f"whole_data/{name}/peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True)
    parser.add_argument("--cache", required=True, help="the cache folder of a scale benchmark run")
    args = parser.parse_args()
    for name, value in rank_windows_memory(args.shape, args.cache).items():
        print(f"{name}: {value:.6g}", flush=True)
