"""``recpost bench``: speed figures, one ``name: value`` line each, measured in one run.

- ``pretrain/epoch_seconds``, ``pretrain/windows_per_second``: an SFT training epoch through Lightning's
  Trainer, without the validation Lightning runs inside it (median over ``epochs``), and
  ``pretrain/epoch_seconds_with_val``: the same epoch with that validation, what a user waits per epoch
  (before this split, ``pretrain/epoch_seconds`` was this figure).
- ``eval/seconds_all_users``, ``eval/users_per_second``: a full-catalog validation of every user.
- ``step_seconds/<method>`` and ``step_time_ratio/<method>_vs_sft`` for ExpSFT, DPO and PPO: one training
  step of each method (the module's own ``training_step``, then backward and optimiser step where
  Lightning would do them), on the same batches, interleaved: each repetition runs every method on
  one batch, in a rotating order. Absolute times drift on shared machines; the per-repetition ratio to
  SFT cancels that drift, and the figure is its median. A PPO step is a whole rollout (k samples per
  state, reward-model scores) and its ``ppo_epochs x num_minibatches`` updates; a DPO step samples two
  reference items per state, ranks them with the reward model, and takes one update. PPO and DPO use
  the defaults of ``configs/method/{ppo,dpo}.yaml``; their policy and reward model are randomly
  initialised (the reward model's biases set from the data so pairs are not all ties), which costs
  the same as trained ones.
- ``train/samples_per_second``: next-item targets per second in those SFT steps (median).
- ``mfu/sft``: model FLOPs utilisation of those SFT steps, relative to what this machine's plain
  ``torch`` matmuls achieve (not a datasheet peak); see :func:`sft_step_flops` and
  :func:`matmul_flops_per_second`.
- ``mfu/sft_useful``: the same with only the FLOPs on real items (no padding), and
  ``train/padding_share``: the share of the batches' positions that are padding.
- ``pretrain/epoch_seconds/<backbone>`` and ``step_time_ratio/<backbone>_vs_sasrec`` for each other
  backbone (HSTU) at the same width, depth, heads and history length, and ``step_time_ratio/<backbone>/
  <method>_vs_sft``: the method ratios on that backbone.
- ``memory/peak_mib/<method>``: the peak resident memory of a few training steps of each method, each in a
  fresh process (``--memory true``; on a GPU, the peak of allocated device memory).

On a large catalog (``--dataset sim --n_items 100000``; from 20,000 items) the methods run their
large-catalog paths: SFT and ExpSFT a sampled softmax (1,024 negatives), PPO and DPO the catalog a chunk
of 8,192 items at a time (PPO with the sampled ``k3`` KL), evaluation in chunks too. ``--device cuda``
runs everything on a GPU.

``--dataset synthetic --shape ml20m|books`` measures every stage at a real data set's shape instead, on
synthetic data written in its official layout, with the shipped configs' settings (``recpost.bench.scale``;
``docs/scale/costs.md``).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Literal

import torch

from recpost.bench.flops import matmul_flops_per_second, sft_step_flops
from recpost.bench.memory import peak_mib
from recpost.bench.steps import (
    CHUNK,
    LARGE_CATALOG,
    METHODS,
    batches,
    datamodule,
    epoch_seconds,
    interleaved_step_seconds,
    method_settings,
    method_steps,
)
from recpost.core.errors import RecpostError
from recpost.methods import SFT
from recpost.models import BackboneConfig

__all__ = ["bench", "matmul_flops_per_second", "sft_step_flops"]


def _ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Median per-repetition ratio of each method's step time to SFT's."""
    return {name: statistics.median(t / s for t, s in zip(times[name], times["sft"])) for name in times if name != "sft"}


def bench(
    dataset: Literal["ml100k", "ml1m", "sim", "synthetic"] = "ml100k",
    epochs: int = 2,
    steps: int | None = None,
    max_len: int = 200,
    batch_size: int = 128,
    d_model: int = 64,
    n_layers: int = 2,
    backbones: list[str] = ["sasrec", "hstu"],  # noqa: B006 - jsonargparse reads the default from the signature
    n_items: int = 1000,
    length_grouping: int = 0,
    memory: bool = False,
    device: Literal["cpu", "cuda"] = "cpu",
    shape: Literal["ml20m", "books"] = "ml20m",
    data_root: str = "~/.cache/recpost/synthetic",
    eval_users: int = 2048,
    memory_limit_gib: float | None = 16.0,
    precision: Literal["32-true", "bf16-mixed"] = "32-true",
    output: str | None = None,
    methods: list[str] | None = None,
) -> dict[str, float]:
    """Measure and print pretraining epoch time, evaluation throughput, method step-time ratios and MFU.

    Args:
        dataset: ``ml100k`` (MovieLens-100K under $RECPOST_DATA_DIR), ``ml1m`` (MovieLens-1M; this
            project's users 1-2,999 subset at $RECPOST_DATA_DIR/ml-1m-users1-2999 when present), ``sim``, or
            ``synthetic``: every stage at the ``shape`` of a real data set (``docs/scale/costs.md``).
        epochs: training epochs to time (each followed by a full validation).
        steps: timed interleaved repetitions (one training step of every method each) for the ratios
            (default 8); ``synthetic``: timed steps per method after one warm-up (default 3).
        max_len: history length.
        batch_size: training windows per batch.
        d_model: backbone width.
        n_layers: backbone depth.
        backbones: backbones to time against SASRec at the same size; the first is the one of the
            method figures (``step_time_ratio/<method>_vs_sft``).
        n_items: the simulator's catalog size (``dataset: sim``); from 20,000 the large-catalog paths.
        length_grouping: ``data.length_grouping`` of the training batches (0: plain shuffled batches).
        memory: also measure each method's peak memory (a fresh process per method; a minute or two).
        device: ``cpu`` or ``cuda`` (a GPU; the figures then time the GPU).
        shape: ``synthetic``: ``ml20m`` (MovieLens-20M's counts) or ``books`` (Amazon Books 2014 5-core's),
            with the settings of ``configs/pretrain/<data>.yaml`` and ``configs/experiments/paper_<data>.yaml``.
        data_root: ``synthetic``: where the synthetic files are written (and reused); never the real data's root.
        eval_users: ``synthetic``: validation users timed per model.
        memory_limit_gib: ``synthetic``: address-space limit of each stage's process (null: none).
        precision: ``synthetic``: the steps' precision (``bf16-mixed`` on a GPU).
        output: ``synthetic``: also write the figures as JSON here, after every stage (a stopped run keeps what it measured).
        methods: ``synthetic``: the stages to time (``pretrain``, ``base``, method names); default every one.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RecpostError("--device cuda: no CUDA device is visible to torch here; run on a GPU machine or use --device cpu")
    if dataset == "synthetic":
        from recpost.bench.scale import scale_bench

        return scale_bench(shape, data_root, methods=methods, steps=steps or 3, eval_users=eval_users, device=device,
                           memory_limit_gib=memory_limit_gib, output=output, precision=precision)
    steps = steps or 8
    torch.manual_seed(0)
    dm = datamodule(dataset, max_len, batch_size, n_items, length_grouping)
    backbone = BackboneConfig(name=backbones[0], d_model=d_model, n_layers=n_layers)
    common = dict(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=max_len, backbone=backbone)
    large = dm.n_items >= LARGE_CATALOG
    figures: dict[str, float] = {"threads": float(torch.get_num_threads()), "n_items": float(dm.n_items)}

    timer = epoch_seconds(SFT(**common, **method_settings("sft", dm.n_items),
                              **({"score_chunk_size": CHUNK} if large else {})), dm, epochs, device)
    figures["pretrain/epoch_seconds"] = statistics.median(timer.train)  # training only
    figures["pretrain/epoch_seconds_with_val"] = statistics.median(timer.with_val)  # what a user waits per epoch
    figures["pretrain/windows_per_second"] = len(dm.train_windows()[0]) / figures["pretrain/epoch_seconds"]
    figures["eval/seconds_all_users"] = statistics.median(timer.val)
    figures["eval/users_per_second"] = dm.data.n_users / figures["eval/seconds_all_users"]

    times, timed = interleaved_step_seconds(method_steps(dm, common, device), batches(dm), steps)
    for name, seconds in times.items():
        figures[f"step_seconds/{name}"] = statistics.median(seconds)
    figures.update({f"step_time_ratio/{name}_vs_sft": r for name, r in _ratios(times).items()})
    n_targets = [int((b["next_items"] > 0).sum()) for b in timed]
    figures["train/samples_per_second"] = statistics.median(n / s for n, s in zip(n_targets, times["sft"]))
    figures["train/padding_share"] = 1.0 - statistics.mean(float((b["input_items"] > 0).float().mean()) for b in timed)
    if not large and device == "cpu":  # the FLOP count is that of the full softmax over the catalog
        achieved = statistics.median(sft_step_flops(b, backbone, dm.n_items) / s for b, s in zip(timed, times["sft"]))
        useful = statistics.median(sft_step_flops(b, backbone, dm.n_items, useful=True) / s
                                   for b, s in zip(timed, times["sft"]))
        peak = matmul_flops_per_second(timed[0], backbone, dm.n_items)
        figures["mfu/sft_model_gflops_per_second"] = achieved / 1e9
        figures["mfu/matmul_gflops_per_second"] = peak / 1e9
        figures["mfu/sft"] = achieved / peak
        figures["mfu/sft_useful"] = useful / peak
    figures.update(_other_backbones(dm, common, backbones, epochs, steps, device))
    if memory:
        settings = dict(dataset=dataset, max_len=max_len, batch_size=batch_size, n_items=n_items, d_model=d_model,
                        n_layers=n_layers, backbone=backbones[0], length_grouping=length_grouping, device=device,
                        threads=torch.get_num_threads())
        for name in METHODS:
            figures[f"memory/peak_mib/{name}"] = peak_mib({**settings, "method": name})
    for name, value in figures.items():
        print(f"{name}: {value:.4g}", flush=True)
    return figures


def _other_backbones(dm, common: dict, backbones: list[str], epochs: int, steps: int, device: str) -> dict[str, float]:
    """Per other backbone: its SFT epoch time, its SFT step time over the first backbone's at the same size
    (interleaved on the same batches), and every method's step-time ratio to SFT on it."""
    figures: dict[str, float] = {}
    first = backbones[0]
    for name in backbones[1:]:
        settings = {**common, "backbone": dataclasses.replace(common["backbone"], name=name)}
        torch.manual_seed(0)
        sft_settings = method_settings("sft", dm.n_items)
        figures[f"pretrain/epoch_seconds/{name}"] = statistics.median(
            epoch_seconds(SFT(**settings, **sft_settings), dm, epochs, device).train)
        pair = {first: method_steps(dm, common, device, names=["sft"])["sft"],
                name: method_steps(dm, settings, device, names=["sft"])["sft"]}
        times, _ = interleaved_step_seconds(pair, batches(dm), steps)
        figures[f"step_time_ratio/{name}_vs_{first}"] = statistics.median(
            t / s for t, s in zip(times[name], times[first]))
        times, _ = interleaved_step_seconds(method_steps(dm, settings, device), batches(dm), steps)
        figures.update({f"step_time_ratio/{name}/{method}_vs_sft": r for method, r in _ratios(times).items()})
    return figures
