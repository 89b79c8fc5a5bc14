"""Large catalogs: training step and evaluation cost at 10^4, 10^5 and 10^6 items.

    python -m pytest -m benchmark -s tests/benchmarks/bench_catalog.py

Prints ``name: value`` lines. Data: simulator sequences (``candidates`` exposure, so every size
generates in seconds) over the whole world catalog: the model scores all ``n_items`` world items.
Model: SASRec d=64, 2 layers, histories of 50, 32 training windows per step (~1,600 targets).

Each configuration runs in a fresh subprocess under an address-space limit (``RLIMIT_AS``,
``RECPOST_BENCH_MEM_GIB``, default 6), so one that does not fit reports ``OOM`` instead of taking the
machine down. Memory is the process's resident set: ``rss_before`` after the model, optimiser state
and data are in place, ``peak_rss`` its high-water mark during the measured steps (reset in between
through ``/proc/self/clear_refs``). Threads: ``RECPOST_BENCH_THREADS`` (default 1).

- ``train_full``: full softmax over the catalog (logits ``[targets, n_items + 1]``);
- ``train_sampled_uniform`` / ``train_sampled_popularity``: sampled softmax, 1,024 shared negatives;
- ``eval_chunked``: the evaluation step (ranking metrics) for 1,000 users in batches of 250,
  ``score_chunk_size`` 65,536; ``eval_full``: the same with one matmul over the catalog.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIZES = {"1e4": 10_000, "1e5": 100_000, "1e6": 1_000_000}
MODES = ("train_full", "train_sampled_uniform", "train_sampled_popularity", "eval_chunked", "eval_full")
N_USERS = 2_000
MAX_LEN = 50
BATCH_SIZE = 32  # training windows per step
NUM_NEGATIVES = 1_024
CHUNK = 65_536  # score_chunk_size of eval_chunked
EVAL_USERS, EVAL_BATCH = 1_000, 250
WARMUP_STEPS, TIMED_STEPS = 1, 3
TIMEOUT_S = 600


# ----------------------------------------------------------------------------------- worker (subprocess)
def _memory_mib() -> tuple[float, float]:
    """(current, peak) resident set of this process in MiB."""
    status = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM"))
    return rss / 1024, hwm / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _worker(cfg: dict) -> dict:
    limit = int(cfg["mem_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from recpost.evaluation import RankingMetrics
    from recpost.methods import SFT
    from recpost.models import BackboneConfig

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    data = torch.load(cfg["data"], weights_only=True)
    items, offsets, n_items = data["items"], data["offsets"], int(data["n_items"])  # ids 1..n_items
    mode = cfg["mode"]
    kw = {}
    if mode.startswith("train_sampled"):
        kw = {"softmax": "sampled", "num_negatives": NUM_NEGATIVES, "negative_sampler": mode.rsplit("_", 1)[1]}
    if mode == "eval_chunked":
        kw["score_chunk_size"] = CHUNK
    model = SFT(n_items=n_items, max_len=MAX_LEN, backbone=BackboneConfig(d_model=64, n_layers=2, n_heads=2), **kw)

    def window(u: int, end: int, width: int) -> torch.Tensor:
        seq = items[max(int(offsets[u]), end - width):end]
        return torch.cat([torch.zeros(width - len(seq), dtype=torch.long), seq])

    if mode.startswith("train"):
        if kw.get("negative_sampler") == "popularity":  # training part: all but each user's last item
            last = offsets[1:] - 1
            train = torch.ones(len(items), dtype=torch.bool)
            train[last] = False
            model.set_item_counts(torch.bincount(items[train], minlength=n_items + 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()

        def batch(step: int) -> dict[str, torch.Tensor]:
            users = [(step * BATCH_SIZE + i) % (len(offsets) - 1) for i in range(BATCH_SIZE)]
            w = torch.stack([window(u, int(offsets[u + 1]) - 1, MAX_LEN + 1) for u in users])  # [B, L + 1]
            inputs, targets = w[:, :-1], w[:, 1:] * (w[:, :-1] > 0)
            return {"input_items": inputs, "target_items": targets, "rewards": (targets > 0).float() * 4.0}

        def step(i: int) -> tuple[float, float, float]:
            """(loss, seconds of loss + backward, seconds of the optimiser step)."""
            b = batch(i)
            start = time.perf_counter()
            loss, _ = model.training_loss(b)
            opt.zero_grad()
            loss.backward()
            middle = time.perf_counter()
            opt.step()
            return loss.item(), middle - start, time.perf_counter() - middle

        for i in range(WARMUP_STEPS):
            step(i)
        rss_before, _ = _memory_mib()
        _reset_peak()
        losses, loss_backward, optimizer = zip(*(step(WARMUP_STEPS + i) for i in range(TIMED_STEPS)))
        _, peak = _memory_mib()
        n_targets = int((batch(0)["target_items"] > 0).sum())
        return {
            "step_seconds": (sum(loss_backward) + sum(optimizer)) / TIMED_STEPS,
            "loss_backward_seconds": sum(loss_backward) / TIMED_STEPS, "adamw_seconds": sum(optimizer) / TIMED_STEPS,
            "rss_before_mib": rss_before, "peak_rss_mib": peak, "loss": losses[-1], "targets_per_step": n_targets,
        }

    model.eval()
    batches = []
    for s in range(0, EVAL_USERS, EVAL_BATCH):
        users = list(range(s, s + EVAL_BATCH))
        ends = [int(offsets[u + 1]) - 1 for u in users]  # history: all but the last item, the target
        hist = torch.stack([window(u, e, MAX_LEN) for u, e in zip(users, ends)])
        batches.append({
            "user_index": torch.tensor(users), "input_items": hist, "input_ratings": torch.zeros(hist.shape),
            "history_items": hist, "target_item": items[torch.tensor(ends)],
            "target_rating": torch.full((len(users),), 4.0),
            "target_liked": torch.ones(len(users), dtype=torch.bool),
        })
    metrics = RankingMetrics(n_items)
    with torch.no_grad():
        model._eval_step(batches[0], metrics)  # warm-up
        metrics.reset()
        rss_before, _ = _memory_mib()
        _reset_peak()
        start = time.perf_counter()
        for b in batches:
            model._eval_step(b, metrics)
        seconds = time.perf_counter() - start
        _, peak = _memory_mib()
    return {"seconds_per_1000_users": seconds * 1000 / EVAL_USERS, "rss_before_mib": rss_before, "peak_rss_mib": peak,
            "ndcg@10": metrics.compute()["ndcg@10"]}


# ----------------------------------------------------------------------------------- driver
def _simulated_sequences(n_items: int, path: Path) -> Path:
    """Sequences of ``N_USERS`` simulator users over a world of ``n_items`` items (ids 1..n_items)."""
    import torch

    from recpost.data import Simulator
    from recpost.data.simulator import WorldConfig

    sim = Simulator(WorldConfig(n_users=N_USERS, n_items=n_items, candidates=1_000, seed=0), min_seq_len=20, max_seq_len=60)
    data = sim.generate()  # user-major, chronological
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(data["user"], minlength=N_USERS).cumsum(0)])
    torch.save({"items": data["item"] + 1, "offsets": offsets, "n_items": n_items}, path)
    return path


def _run(cfg: dict) -> dict | str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        out = subprocess.run([sys.executable, __file__, json.dumps(cfg)], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"timeout (> {TIMEOUT_S} s)"
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1])
    if "can't allocate memory" in out.stderr or "MemoryError" in out.stderr or out.returncode < 0:
        return f"OOM (address space limit {cfg['mem_gib']:g} GiB)"
    raise RuntimeError(f"{cfg['mode']} at {cfg['data']} failed:\n{out.stderr[-3000:]}")


@pytest.mark.benchmark
@pytest.mark.parametrize("size", list(SIZES))
def test_catalog_training_and_evaluation_cost(size: str, tmp_path: Path) -> None:
    n_items = SIZES[size]
    data = _simulated_sequences(n_items, tmp_path / "sequences.pt")
    threads = int(os.environ.get("RECPOST_BENCH_THREADS", "1"))
    mem_gib = float(os.environ.get("RECPOST_BENCH_MEM_GIB", "6"))
    print(f"\ncatalog_{size}_items: {n_items}")
    print(f"catalog_{size}_threads: {threads}")
    for mode in MODES:
        result = _run({"mode": mode, "data": str(data), "threads": threads, "mem_gib": mem_gib})
        if isinstance(result, str):
            print(f"catalog_{size}_{mode}: {result}")
            continue
        for name, value in result.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"catalog_{size}_{mode}_{name}: {shown}")
    assert n_items > 0


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
