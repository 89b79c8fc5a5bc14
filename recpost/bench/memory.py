"""Peak memory of one method's training steps, each method in a fresh process (the resident set's
high-water mark is per process): ``python -m recpost.bench.memory '<json settings>'`` prints one
``peak_mib: <value>`` line. On a GPU the peak of allocated device memory is measured in process instead."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

STEPS = 2  # measured steps, after one unmeasured


def _resident_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def measure(settings: dict) -> float:
    """Peak memory (MiB) of ``STEPS`` training steps of ``settings["method"]`` after setup and one step:
    the data, the model, the optimiser state and everything a step holds at its peak."""
    from recpost.bench.steps import batches, datamodule, method_steps
    from recpost.models import BackboneConfig

    torch.manual_seed(0)
    dm = datamodule(settings["dataset"], settings["max_len"], settings["batch_size"], settings["n_items"],
                    settings["length_grouping"])
    backbone = BackboneConfig(name=settings["backbone"], d_model=settings["d_model"], n_layers=settings["n_layers"])
    common = dict(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=settings["max_len"], backbone=backbone)
    step = method_steps(dm, common, settings["device"], names=[settings["method"]])[settings["method"]]
    stream = batches(dm)
    step(next(stream), 0)
    if settings["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak()
    for i in range(STEPS):
        step(next(stream), i + 1)
    if settings["device"] == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _resident_mib()


def peak_mib(settings: dict, timeout: int = 900) -> float:
    """``measure`` in a fresh process (CPU) or in this one (GPU)."""
    if settings["device"] == "cuda":
        return measure(settings)
    out = subprocess.run([sys.executable, "-m", "recpost.bench.memory", json.dumps(settings)],
                         capture_output=True, text=True, timeout=timeout)
    found = re.search(r"^peak_mib: ([0-9.]+)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"memory measurement of {settings['method']} failed:\n{out.stderr[-2000:]}")
    return float(found.group(1))


if __name__ == "__main__":
    torch.set_num_threads(int(json.loads(sys.argv[1]).get("threads", torch.get_num_threads())))
    print(f"peak_mib: {measure(json.loads(sys.argv[1])):.1f}")
