"""``recpost bench``: speed figures, one ``name: value`` line each, measured in one run.

- ``pretrain/epoch_seconds``, ``pretrain/windows_per_second``: an SFT training epoch through Lightning's
  Trainer (median over ``epochs``).
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
- ``pretrain/epoch_seconds/<backbone>`` and ``step_time_ratio/<backbone>_vs_sasrec`` for each other
  backbone (HSTU) at the same width, depth, heads and history length.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from recpost.checkpoint import save_checkpoint
from recpost.data import MovieLens, RecDataModule
from recpost.data.sources import default_data_root
from recpost.methods import DPO, PPO, SFT, ExpSFT, RewardModel
from recpost.models import BackboneConfig

WARMUP_REPETITIONS = 1  # the first interleaved repetition is not timed: allocators and caches warm up


class _Timer(L.Callback):
    """Wall time of each training epoch (without validation) and of each validation loop."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train.append(time.perf_counter() - self._t)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._v = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val.append(time.perf_counter() - self._v)


def _datamodule(dataset: str, max_len: int, batch_size: int) -> RecDataModule:
    if dataset == "ml100k":
        source = MovieLens("100k", download=False)
    elif dataset == "ml1m":
        # This project's copy is the subset of users 1..2,999 in its own root; a full ML-1M archive
        # under $RECPOST_DATA_DIR is used when the subset folder is not there.
        subset = default_data_root() / "ml-1m-users1-2999"
        source = MovieLens("1m", root=str(subset) if subset.is_dir() else None, download=False)
    else:
        from recpost.data import Simulator

        source = Simulator()
    return RecDataModule(source, max_len=max_len, batch_size=batch_size, eval_batch_size=1024)


# ----------------------------------------------------------------------------------- FLOPs
def sft_step_flops(batch: dict[str, torch.Tensor], backbone: BackboneConfig, n_items: int, useful: bool = False) -> float:
    """Matmul FLOPs of one SASRec SFT training step (full softmax) on ``batch``, counted analytically;
    ``useful``: only the work on real items (each row's valid positions, and their valid x valid
    attention), what the step would cost without any padding.

    Forward: ``2 * m * n * k`` per ``[m, k] @ [k, n]`` matmul; backward twice the forward (gradients
    of both operands), so a step is 3 x forward:

    - dense layers: ``(3 + 1 + 2 * ff_mult) * d^2`` weights per block (qkv, output projection, FFN),
      applied to every one of the ``B * L`` positions (padding included: the encoder computes it);
    - attention: ``Q K^T`` and ``A V``, ``2 * L^2 * d`` each per row and block (the full L x L, as the
      masked kernel computes it);
    - catalog logits: ``[N, d] @ [d, n_items + 1]`` for the N positions that have a target (only those
      reach the output layer).

    Embedding look-ups, layer norms, softmax and the optimiser are not matmuls and are not counted.
    """
    B, L = batch["input_items"].shape
    d = backbone.d_model
    n_targets = int((batch["next_items"] > 0).sum())
    lengths = (batch["input_items"] > 0).sum(1).double() if useful else torch.full((B,), float(L), dtype=torch.float64)
    dense = 2 * float(lengths.sum()) * (4 + 2 * backbone.ff_mult) * d * d
    attention = 2 * 2 * float((lengths**2).sum()) * d
    logits = 2 * n_targets * d * (n_items + 1)
    return 3.0 * (backbone.n_layers * (dense + attention) + logits)


def matmul_flops_per_second(
    batch: dict[str, torch.Tensor], backbone: BackboneConfig, n_items: int, repeats: int = 5
) -> float:
    """FLOPs/s of plain fp32 ``torch`` matmuls with the shapes of the SFT forward pass on ``batch``.

    The same matmuls :func:`sft_step_flops` counts (per block: qkv, attention scores and values,
    projection, FFN; then the catalog logits), on random tensors, timed together; median of
    ``repeats`` after one warm-up. The backward pass runs matmuls of the same sizes, so this is the
    rate a step made only of its matmuls would reach on this machine with the threads torch uses.
    """
    B, L = batch["input_items"].shape
    d, h, ff = backbone.d_model, backbone.n_heads, backbone.ff_mult * backbone.d_model
    n_targets = int((batch["next_items"] > 0).sum())
    x, hidden = torch.randn(B * L, d), torch.randn(B * L, ff)  # [B*L, d], [B*L, ff*d]
    q, k = torch.randn(B * h, L, d // h), torch.randn(B * h, d // h, L)  # per head
    att = torch.randn(B * h, L, L)
    per_block = [
        (x, torch.randn(d, 3 * d)), (q, k), (att, q), (x, torch.randn(d, d)), (x, torch.randn(d, ff)),
        (hidden, torch.randn(ff, d)),
    ]
    pairs = per_block * backbone.n_layers + [(torch.randn(n_targets, d), torch.randn(d, n_items + 1))]
    flops = sum(2.0 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1] for a, b in pairs)
    seconds = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        for a, b in pairs:
            torch.matmul(a, b)
        seconds.append(time.perf_counter() - t)
    return flops / statistics.median(seconds[1:])


# ----------------------------------------------------------------------------------- interleaved steps
class _Step:
    """One method set up for timed training steps with Fabric (no Trainer), running the method's own
    ``training_step``; for automatic-optimisation methods also the backward and optimiser step that
    Lightning's loop would add. Fabric has no LR schedulers: all methods train at a constant rate."""

    def __init__(self, module: L.LightningModule, lr: float = 1e-3) -> None:
        module.lr_schedulers = lambda: None  # what PPO's manual loop asks for; None = constant rate
        self.fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
        opt = torch.optim.AdamW(module.parameters(), lr=lr)
        self.module, self.opt = self.fabric.setup(module, opt)
        self.automatic = module.automatic_optimization
        self.module.train()

    def __call__(self, batch: dict[str, torch.Tensor], batch_idx: int) -> float:
        """Seconds of one full training step on ``batch``."""
        t = time.perf_counter()
        loss = self.module.training_step(batch, batch_idx)
        if self.automatic:
            self.opt.zero_grad(set_to_none=True)
            self.fabric.backward(loss)
            self.opt.step()
        return time.perf_counter() - t


def _method_steps(dm: RecDataModule, common: dict, workdir: Path) -> dict[str, _Step]:
    """SFT, ExpSFT, DPO and PPO modules from the same initial weights (config defaults for each)."""
    torch.manual_seed(0)
    rm = RewardModel(**common)
    train = dm.training_interactions()
    rm.init_biases(train.item, train.rating)
    rm_path = save_checkpoint(rm, workdir / "reward_model.ckpt")
    torch.manual_seed(0)
    sft = SFT(**common)
    pre_path = save_checkpoint(sft, workdir / "policy.ckpt")
    post = dict(common, init_from=str(pre_path))
    return {
        "sft": _Step(sft),
        "exp_sft": _Step(ExpSFT(**post, lam=1.0)),
        "dpo": _Step(DPO(**post, reward_model=str(rm_path))),
        "ppo": _Step(PPO(**post, reward_model=str(rm_path))),
    }


def _batches(dm: RecDataModule) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches forever (a new shuffled epoch whenever one ends)."""
    while True:
        yield from dm.train_dataloader()


def interleaved_step_seconds(
    steps: dict[str, _Step], batches: Iterator[dict[str, torch.Tensor]], repetitions: int
) -> tuple[dict[str, list[float]], list[dict[str, torch.Tensor]]]:
    """Seconds per step of every method, ``repetitions`` times, each repetition on one batch with the
    methods in a rotating order (no method always runs first, after another, or on a cold cache).

    Returns ``({method: [seconds per repetition]}, [the batches timed])``.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    timed_batches = []
    for i in range(repetitions + WARMUP_REPETITIONS):
        batch = next(batches)
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = steps[name](batch, i)
            if i >= WARMUP_REPETITIONS:
                times[name].append(seconds)
        if i >= WARMUP_REPETITIONS:
            timed_batches.append(batch)
    return times, timed_batches


def _epoch_seconds(module: SFT, dm: RecDataModule, epochs: int) -> _Timer:
    """Train ``module`` for ``epochs`` through Lightning's Trainer (each epoch followed by a validation)."""
    timer = _Timer()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    return timer


def backbone_figures(dm: RecDataModule, common: dict, backbones: list[str], epochs: int, steps: int) -> dict[str, float]:
    """Per other backbone: its SFT epoch time and its SFT step time over SASRec's at the same ``d_model``,
    depth, heads and history length (interleaved on the same batches, median of the per-step ratios)."""
    figures: dict[str, float] = {}
    cfg = common["backbone"]
    steps_by_name = {}
    for name in ["sasrec", *[b for b in backbones if b != "sasrec"]]:
        settings = {**common, "backbone": dataclasses.replace(cfg, name=name)}
        if name != "sasrec":
            torch.manual_seed(0)
            figures[f"pretrain/epoch_seconds/{name}"] = statistics.median(_epoch_seconds(SFT(**settings), dm, epochs).train)
        torch.manual_seed(0)
        steps_by_name[name] = _Step(SFT(**settings))
    times, _ = interleaved_step_seconds(steps_by_name, _batches(dm), steps)
    for name in steps_by_name:
        if name != "sasrec":
            figures[f"step_time_ratio/{name}_vs_sasrec"] = statistics.median(
                t / s for t, s in zip(times[name], times["sasrec"]))
    return figures


def bench(
    dataset: Literal["ml100k", "ml1m", "sim"] = "ml100k",
    epochs: int = 2,
    steps: int = 8,
    max_len: int = 200,
    batch_size: int = 128,
    d_model: int = 64,
    n_layers: int = 2,
    backbones: list[str] = ["sasrec", "hstu"],  # noqa: B006 - jsonargparse reads the default from the signature
) -> dict[str, float]:
    """Measure and print pretraining epoch time, evaluation throughput, method step-time ratios and MFU.

    Args:
        dataset: ``ml100k`` (MovieLens-100K under $RECPOST_DATA_DIR), ``ml1m`` (MovieLens-1M; this
            project's users 1-2,999 subset at $RECPOST_DATA_DIR/ml-1m-users1-2999 when present) or ``sim``.
        epochs: training epochs to time (each followed by a full validation).
        steps: timed interleaved repetitions (one training step of every method each) for the ratios.
        max_len: history length.
        batch_size: training windows per batch.
        d_model: backbone width.
        n_layers: backbone depth.
        backbones: backbones to time against SASRec at the same size (``pretrain/epoch_seconds/<name>``,
            ``step_time_ratio/<name>_vs_sasrec``); the method figures use SASRec.
    """
    torch.manual_seed(0)
    dm = _datamodule(dataset, max_len, batch_size)
    backbone = BackboneConfig(d_model=d_model, n_layers=n_layers)
    common = dict(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=max_len, backbone=backbone)
    figures: dict[str, float] = {"threads": float(torch.get_num_threads())}

    timer = _epoch_seconds(SFT(**common), dm, epochs)
    figures["pretrain/epoch_seconds"] = statistics.median(timer.train)
    figures["pretrain/windows_per_second"] = len(dm.train_windows()[0]) / figures["pretrain/epoch_seconds"]
    figures["eval/seconds_all_users"] = statistics.median(timer.val)
    figures["eval/users_per_second"] = dm.data.n_users / figures["eval/seconds_all_users"]

    with tempfile.TemporaryDirectory(prefix="recpost-bench-") as workdir:
        methods = _method_steps(dm, common, Path(workdir))
        times, batches = interleaved_step_seconds(methods, _batches(dm), steps)
    for name, seconds in times.items():
        figures[f"step_seconds/{name}"] = statistics.median(seconds)
    for name in ("exp_sft", "dpo", "ppo"):
        figures[f"step_time_ratio/{name}_vs_sft"] = statistics.median(
            t / s for t, s in zip(times[name], times["sft"])
        )

    n_targets = [int((b["next_items"] > 0).sum()) for b in batches]
    figures["train/samples_per_second"] = statistics.median(n / s for n, s in zip(n_targets, times["sft"]))
    achieved = statistics.median(sft_step_flops(b, backbone, dm.n_items) / s for b, s in zip(batches, times["sft"]))
    useful = statistics.median(sft_step_flops(b, backbone, dm.n_items, useful=True) / s
                               for b, s in zip(batches, times["sft"]))
    peak = matmul_flops_per_second(batches[0], backbone, dm.n_items)
    figures["mfu/sft_model_gflops_per_second"] = achieved / 1e9
    figures["mfu/matmul_gflops_per_second"] = peak / 1e9
    figures["mfu/sft"] = achieved / peak
    figures["mfu/sft_useful"] = useful / peak
    figures["train/padding_share"] = 1.0 - statistics.mean(
        float((b["input_items"] > 0).float().mean()) for b in batches)
    figures.update(backbone_figures(dm, common, backbones, epochs, steps))
    for name, value in figures.items():
        print(f"{name}: {value:.4g}")
    return figures
