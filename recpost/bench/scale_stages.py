"""One stage of the scale benchmark, in its own process (the resident set's high-water mark is per process):

    python -m recpost.bench.scale_stages '<json job>'

prints ``name: value`` lines. A job is ``{"stage": ..., "shape": ..., "cache_dir": ..., ...}``; the data root
is ``$RECPOST_DATA_DIR`` (where ``recpost.bench.synthetic`` wrote the files), as for the real data.

- ``preprocess``: the shipped pretrain config's data from a cold cache (source, validation, preprocessing,
  Arrow cache), then its training windows: seconds, counts and peak memory;
- ``step``: one method at the shipped settings (``recpost.bench.shipped``) for ``steps`` training steps after
  one warm-up, each through the method's own ``training_step`` (``steps.Step``); its matmul FLOPs
  counted by ``torch.utils.flop_counter`` on one more step; peak memory;
- ``eval``: a full-catalog validation of ``eval_users`` random users (the study's ``eval_min_rating`` users,
  with its judges), as ``validation_step`` does it: users/s and peak memory.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recpost.bench.memory import _resident_mib
from recpost.bench.shipped import MethodSettings, shipped_study
from recpost.bench.steps import Step, batches
from recpost.core.errors import RecpostError
from recpost.data import RecDataModule
from recpost.methods import SFT
from recpost.models import BackboneConfig
from recpost.models.checkpoint import save_checkpoint

REWARD_MODEL = "reward_model"


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads): on a shared machine, steadier than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _gpu_peak(job: dict) -> dict[str, float]:
    """On a GPU, the peak of allocated device memory (the resident set is then the host's part)."""
    return {"gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20} if job["device"] == "cuda" else {}


def _current_mib() -> float:
    import re

    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def datamodule(job: dict, method: MethodSettings | None = None) -> RecDataModule:
    """The shipped pretrain config's data (its ``data:`` section, then the method config's, if any), the cache
    under ``job["cache_dir"]``."""
    study = shipped_study(job["shape"])
    dm = RecDataModule.from_configs([study.pretrain_config, *([method.config] if method and method.config else [])])
    dm.cache_dir = Path(job["cache_dir"])
    dm.eval_min_rating = study.eval_min_rating
    return dm


def module(settings: MethodSettings, dm: RecDataModule, **given):
    """The method of ``settings`` on ``dm``'s catalog, with checkpoints ``given`` (init_from, reward_model, ...)."""
    args = dict(settings.init_args)
    args["backbone"] = BackboneConfig(**args["backbone"])
    args.update(given)
    return settings.method_class(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=dm.max_len, **args)


def checkpoints(job: dict, dm: RecDataModule, workdir: Path, reward_models: int) -> dict:
    """A policy checkpoint (the study's base settings) and ``reward_models`` reward-model checkpoints, randomly
    initialised (the heads' biases from the data, so that reward-model pairs are not all ties): a trained
    model costs the same per step."""
    study = shipped_study(job["shape"])
    torch.manual_seed(0)
    policy = str(save_checkpoint(module(study.methods["base"], dm), workdir / "policy.ckpt"))
    train = dm.training_interactions()
    rms = []
    for seed in range(reward_models):
        torch.manual_seed(seed)
        rm = module(study.methods[REWARD_MODEL], dm, init_from=policy)
        if hasattr(rm, "init_biases"):
            rm.init_biases(train.item, train.rating)
        rms.append(str(save_checkpoint(rm, workdir / f"reward_model_{seed}.ckpt")))
    return {"policy": policy, "reward_models": rms}


def method_settings(job: dict) -> MethodSettings:
    """The settings of the job's method: ``pretrain`` (the pretrain config), ``base`` or a method of the study."""
    from_scratch = job["method"] in ("pretrain", "base")
    study = shipped_study(job["shape"], None if from_scratch else [job["method"]])
    return study.pretrain if job["method"] == "pretrain" else study.methods[job["method"]]


def method_module(job: dict, dm: RecDataModule, workdir: Path):
    """The job's method as the study would fit it: from the base checkpoint (unless the method refuses one, as
    a matrix factorisation does), with the study's reward model (and its reward ensemble) where it takes them;
    ``pretrain`` and ``base`` from scratch."""
    settings = method_settings(job)
    if job["method"] in ("pretrain", "base"):
        torch.manual_seed(0)
        return module(settings, dm)
    made = checkpoints(job, dm, workdir, max(1, settings.reward_ensemble))
    cls = settings.method_class
    given = {"init_from": made["policy"]}
    if getattr(cls, "takes_reward_model", False):
        given["reward_model"] = made["reward_models"][0]
    if settings.reward_ensemble:
        given["reward_ensemble"] = made["reward_models"]
    try:
        cls.check_settings(**{**settings.init_args, **given})
    except RecpostError as exc:
        if "init_from" not in str(exc):
            raise
        del given["init_from"]
    torch.manual_seed(0)
    return module(settings, dm, **given)


def preprocess(job: dict) -> dict[str, float]:
    dm = datamodule(job)
    t, c = time.perf_counter(), _cpu_seconds()
    data = dm.data  # cold cache: read, validate, preprocess, write, open
    figures = {"preprocess_seconds": time.perf_counter() - t, "preprocess_cpu_seconds": _cpu_seconds() - c,
               "preprocess_peak_mib": _resident_mib()}
    t = time.perf_counter()
    w_start, _ = dm.train_windows()
    figures.update(windows_seconds=time.perf_counter() - t, users=data.n_users, items=data.n_items,
                   interactions=len(data.item), windows=len(w_start), val_users=len(dm.eval_users("val")),
                   test_users=len(dm.eval_users("test")), rss_after_windows_mib=_current_mib(),
                   peak_mib=_resident_mib())
    return figures


def step(job: dict) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    dm = datamodule(job, method_settings(job))
    dm.setup("fit")
    with tempfile.TemporaryDirectory(prefix="recpost-scale-") as workdir:
        method = method_module(job, dm, Path(workdir))
        if hasattr(method, "set_item_counts") and getattr(method, "sampled", False):
            method.set_item_counts(dm.train_item_counts())
        run = Step(method, job["device"], precision=job.get("precision", "32-true"))
        setup_mib = _current_mib()
        loader = batches(dm)  # shuffled training batches, a new epoch when one ends
        seconds, cpu, batch_seconds, targets, tokens = [], [], [], [], []
        with FlopCounterMode(display=False) as counter:  # the first step warms up: its FLOPs are counted
            run(next(loader), 0)
        flops = counter.get_total_flops()
        for i in range(1, job["steps"] + 1):
            t = time.perf_counter()
            batch = next(loader)
            gathered = time.perf_counter() - t
            c = _cpu_seconds()
            seconds.append(run(batch, i))
            cpu.append(_cpu_seconds() - c)
            batch_seconds.append(gathered)
            targets.append(int((batch["next_items"] > 0).sum()))
            tokens.append(int((batch["input_items"] > 0).sum()))
    median = statistics.median(seconds)
    return {
        "step_seconds": median, "step_seconds_min": min(seconds),
        "step_cpu_seconds": statistics.median(cpu), "batch_seconds": statistics.median(batch_seconds),
        "targets_per_step": statistics.mean(targets), "tokens_per_step": statistics.mean(tokens),
        "targets_per_second": statistics.median(n / s for n, s in zip(targets, seconds)),
        "tokens_per_second": statistics.median(n / s for n, s in zip(tokens, seconds)),
        "step_flops": float(flops), "windows": len(dm.train_windows()[0]), "batch_size": dm.batch_size,
        "setup_mib": setup_mib, "peak_mib": _resident_mib(), **_gpu_peak(job),
    }


@torch.no_grad()
def evaluate(job: dict) -> dict[str, float]:
    """Validation of ``eval_users`` random validation users by the study's SFT stage (its chunking, its judges),
    or by the pretrain config's model (``job["method"] == "pretrain"``, no judges)."""
    dm = datamodule(job)
    dm.setup("validate")
    study = shipped_study(job["shape"])
    with tempfile.TemporaryDirectory(prefix="recpost-scale-") as workdir:
        if job["method"] == "pretrain":
            policy = module(study.pretrain, dm)
        else:
            made = checkpoints(job, dm, Path(workdir), study.judges)
            policy = module(study.methods["sft"], dm, init_from=made["policy"], judges=made["reward_models"])
    policy = policy.to(job["device"]).eval()
    users = dm.eval_users("val")
    sample = np.sort(np.random.default_rng(0).choice(users, size=min(job["eval_users"], len(users)), replace=False))
    batches = [dm.eval_batch(part, "val") for part in np.array_split(sample, max(1, -(-len(sample) // dm.eval_batch_size)))]
    from torch.utils.flop_counter import FlopCounterMode

    policy.on_validation_epoch_start()
    with FlopCounterMode(display=False) as counter:  # warm-up, not timed: its FLOPs are counted
        policy.validation_step({k: v.to(job["device"]) for k, v in batches[0].items()}, 0)
    flops_per_user = counter.get_total_flops() / len(batches[0]["user_index"])
    policy.val_metrics.reset()
    setup_mib = _current_mib()
    t, c = time.perf_counter(), _cpu_seconds()
    for i, batch in enumerate(batches):
        policy.validation_step({k: v.to(job["device"]) for k, v in batch.items()}, i)
    if job["device"] == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t, _cpu_seconds() - c
    ndcg = float(policy.val_metrics.compute()["ndcg@10"])
    return {"eval_users": len(sample), "eval_seconds": seconds, "eval_cpu_seconds": cpu, "flops_per_user": flops_per_user,
            "users_per_second": len(sample) / seconds,
            "val_users": len(users), "all_users": dm.data.n_users, "eval_batch_size": dm.eval_batch_size,
            "score_chunk_size": float(policy.hparams.score_chunk_size or 0), "ndcg@10": ndcg,
            "setup_mib": setup_mib, "peak_mib": _resident_mib(), **_gpu_peak(job)}


STAGES = {"preprocess": preprocess, "step": step, "eval": evaluate}

if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    for name, value in STAGES[job["stage"]](job).items():
        print(f"{name}: {value}", flush=True)
