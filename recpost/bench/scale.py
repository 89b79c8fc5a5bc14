"""``recpost bench --dataset synthetic --shape ml20m|books``: every stage's cost at a real data set's shape.

On synthetic data of the shape (``recpost.bench.synthetic``, written in the official layout, so the real
loaders run), with the settings the shipped configs give each stage (``recpost.bench.shipped``), each stage
in its own process (``recpost.bench.scale_stages``: its own peak memory, optionally under an address-space
limit), printed as ``name: value`` lines:

- ``preprocess/...``: seconds and peak memory of the cold cache build, the training windows;
- ``step/<method>/...``: step seconds, targets and tokens (non-padding input items) per second, matmul
  FLOPs per step, peak memory, for the pretrain config (``pretrain``), the paper study's pretraining
  (``base``) and every post-training method of the study (and of ``configs/method/`` when asked);
- ``eval/<model>/...``: full-catalog validation throughput (users/s) and peak memory;
- ``projected/...``: one epoch per method (``ceil(windows / batch_size) x (step + batch gathering)``), one
  full validation and test (users / measured users/s) on this machine, and, labelled ``gpu_``, one epoch on
  one GPU from the counted FLOPs at an assumed peak and utilisation (:data:`GPU_PEAK_FLOPS`,
  :data:`GPU_UTILISATION`): a projection, not a measurement.

A stage that fails (out of memory under the limit, an error) prints ``<stage>/failed: 1`` and its last error
line; the others still run. ``tests/benchmarks/bench_scale.py`` adds the whole study's projected time.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

from recpost.bench.shipped import CONFIGS, shipped_study
from recpost.bench.synthetic import Shape, generate, preset
from recpost.core.files import atomic_open

# One modern GPU, for the labelled projection: NVIDIA H100 SXM, dense bf16 tensor-core peak (the datasheet's
# 989 TFLOP/s), at 20% model FLOPs utilisation: these models are small (d = 50-64), their matmuls thin, and the
# catalog softmax and embedding updates are memory-bound, so a high utilisation is not to be expected.
GPU_NAME = "H100 SXM (bf16 dense)"
GPU_PEAK_FLOPS = 989e12
GPU_UTILISATION = 0.20
STAGE_TIMEOUT = 4 * 3600


def _run_stage(job: dict, data_root: Path, memory_limit_gib: float | None) -> tuple[dict[str, float], str | None]:
    """``job`` in a fresh process; returns its figures, and the last error line if it failed."""
    limit = int(memory_limit_gib * 2**30) if memory_limit_gib else None

    def cap() -> None:  # the address space of the stage's process (prlimit --as)
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "RECPOST_DATA_DIR": str(data_root)}
    out = subprocess.run([sys.executable, "-m", "recpost.bench.scale_stages", json.dumps(job)], capture_output=True,
                         text=True, env=env, preexec_fn=cap, timeout=STAGE_TIMEOUT)
    figures = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+): ([-0-9.e+]+)$", out.stdout, re.MULTILINE)}
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        return figures, (lines[-1] if lines else f"exit status {out.returncode}")
    return figures, None


def stage_methods(shape: str, methods: list[str] | None) -> list[str]:
    """``pretrain``, ``base`` and the paper study's methods (``methods``: those, or any ``configs/method/`` name)."""
    if methods:
        return methods
    study = shipped_study(shape)
    extra = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml") if p.stem not in study.methods)
    return ["pretrain", *study.methods, *extra]


def scale_bench(
    shape: str,
    data_root: str | Path,
    methods: list[str] | None = None,
    steps: int = 3,
    eval_users: int = 2048,
    device: str = "cpu",
    memory_limit_gib: float | None = 16.0,
    output: str | None = None,
    size: Shape | None = None,
    precision: str = "32-true",
) -> dict[str, float]:
    """Measure and print every stage at the shape ``shape`` (its shipped configs; ``size``: other counts in
    the same layout, e.g. a small check of the whole path); see the module doc."""
    data_root = Path(data_root).expanduser()
    print(f"data: {generate(size or preset(shape), data_root)['path']} (synthetic)", flush=True)
    cache_dir = data_root / ".bench-cache" / shape
    if cache_dir.exists():  # the preprocessing figure is that of a cold cache
        import shutil

        shutil.rmtree(cache_dir)
    base = {"shape": shape, "cache_dir": str(cache_dir), "device": device, "steps": steps, "eval_users": eval_users,
            "precision": precision}
    figures: dict[str, float] = {"threads": float(os.cpu_count() or 1), "load_average_1min": os.getloadavg()[0]}
    errors: dict[str, str] = {}

    def write() -> None:  # after every stage: a run stopped after hours keeps what it measured
        if output:
            with atomic_open(output) as f:
                json.dump({"figures": figures, "errors": errors, "gpu": GPU_NAME, "gpu_peak_flops": GPU_PEAK_FLOPS,
                           "gpu_utilisation": GPU_UTILISATION}, f, indent=1)

    def stage(prefix: str, job: dict) -> dict[str, float]:
        found, error = _run_stage({**base, **job}, data_root, memory_limit_gib)
        for name, value in found.items():
            figures[f"{prefix}/{name}"] = value
            print(f"{prefix}/{name}: {value:.6g}", flush=True)
        if error:
            figures[f"{prefix}/failed"] = 1.0
            errors[prefix] = error
            print(f"{prefix}/failed: 1 ({error})", flush=True)
        write()
        return found

    data = stage("preprocess", {"stage": "preprocess"})
    for method in stage_methods(shape, methods):
        stage(f"step/{method}", {"stage": "step", "method": method})
    for model in ("pretrain", "sft"):
        stage(f"eval/{model}", {"stage": "eval", "method": model})
    projected = project(figures, data)
    for name, value in projected.items():
        print(f"{name}: {value:.6g}", flush=True)
    figures.update(projected)
    write()
    return figures


def project(figures: dict[str, float], data: dict[str, float] | None = None) -> dict[str, float]:
    """Epoch, validation and test times from the measured figures (see the module doc): wall seconds on this
    machine as measured, CPU seconds (one core's worth; steadier on a shared machine), and the GPU projection."""
    out: dict[str, float] = {}
    methods = {name.split("/")[1] for name in figures if name.startswith("step/") and name.endswith("/step_seconds")}
    gpu_rate = GPU_PEAK_FLOPS * GPU_UTILISATION
    for method in sorted(methods):
        get = lambda key: figures[f"step/{method}/{key}"]  # noqa: E731
        batches = math.ceil(get("windows") / get("batch_size"))
        out[f"projected/epoch_seconds/{method}"] = batches * (get("step_seconds") + get("batch_seconds"))
        if f"step/{method}/step_cpu_seconds" in figures:
            out[f"projected/epoch_cpu_seconds/{method}"] = batches * get("step_cpu_seconds")
        out[f"projected/gpu_epoch_seconds/{method}"] = batches * get("step_flops") / gpu_rate
    for model in ("pretrain", "sft"):
        rate = figures.get(f"eval/{model}/users_per_second")
        if not rate:
            continue
        get = lambda key: figures[f"eval/{model}/{key}"]  # noqa: E731
        for name, users in (("validation", get("val_users")), ("validation_all_users", get("all_users"))):
            out[f"projected/{name}_seconds/{model}"] = users / rate
            if f"eval/{model}/eval_cpu_seconds" in figures:
                out[f"projected/{name}_cpu_seconds/{model}"] = users * get("eval_cpu_seconds") / get("eval_users")
            if f"eval/{model}/flops_per_user" in figures:
                out[f"projected/gpu_{name}_seconds/{model}"] = users * get("flops_per_user") / gpu_rate
    return out
