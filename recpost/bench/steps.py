"""The timed pieces of ``recpost bench``: data, one training step of each method, interleaved timing."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch

from recpost.models.checkpoint import save_checkpoint
from recpost.data import MovieLens, RecDataModule
from recpost.data.sources import default_data_root
from recpost.methods import ASFT, DPO, PPO, SFT, ExpSFT, LinearSFT, RewardModel

WARMUP_REPETITIONS = 1  # the first interleaved repetition is not timed: allocators and caches warm up
LARGE_CATALOG = 20_000  # from this many items the methods use their large-catalog paths
NUM_NEGATIVES = 1_024  # sampled softmax of SFT / ExpSFT on a large catalog
CHUNK = 8_192  # score_chunk_size of PPO / DPO (and evaluation) on a large catalog
# every method recpost trains, as shipped (configs/method/*.yaml): online_dpo and rs_dpo are DPO settings
METHODS = ("sft", "exp_sft", "linear_sft", "asft", "dpo", "online_dpo", "rs_dpo", "ppo")
EVAL_BATCH_SIZE = 128


class Timer(L.Callback):
    """Wall time of each training epoch with and without its validation, and of each validation loop.

    Lightning runs the end-of-epoch validation inside the training epoch (between the last batch and
    ``on_train_epoch_end``), so ``with_val`` is what a user waits per epoch and ``train`` subtracts it.
    """

    def __init__(self) -> None:
        self.train: list[float] = []
        self.with_val: list[float] = []
        self.val: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()
        self._val_in_epoch = 0.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        elapsed = time.perf_counter() - self._t
        self.with_val.append(elapsed)
        self.train.append(elapsed - self._val_in_epoch)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._v = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            seconds = time.perf_counter() - self._v
            self.val.append(seconds)
            self._val_in_epoch += seconds


def datamodule(dataset: str, max_len: int, batch_size: int, n_items: int, length_grouping: int) -> RecDataModule:
    """ML-100K, ML-1M (this project's users 1-2,999 copy when present) or the simulator with ``n_items``."""
    if dataset == "ml100k":
        source = MovieLens("100k", download=False)
    elif dataset == "ml1m":
        # This project's copy is the subset of users 1..2,999 in its own root; a full ML-1M archive
        # under $RECPOST_DATA_DIR is used when the subset folder is not there.
        subset = default_data_root() / "ml-1m-users1-2999"
        source = MovieLens("1m", root=str(subset) if subset.is_dir() else None, download=False)
    else:
        from recpost.data import Simulator
        from recpost.data.simulator import WorldConfig

        # Large worlds expose each user to a random 1,000 items, so generation stays seconds, and have
        # n_items / 5 users, so that nearly every item is consumed by someone (2,000 users would leave
        # more than half of a 10^5-item world out of the catalog).
        large = n_items > 10_000
        world = WorldConfig(n_users=max(2_000, n_items // 5) if large else 2_000, n_items=n_items,
                            candidates=1_000 if large else None)
        source = Simulator(world, max_seq_len=min(60, max_len + 10))
    # 128 users per evaluation batch, as the ML configs: on a CPU larger batches spill the [B, L, L]
    # attention tensors out of cache (ML-1M (users 1-2,999) validation, HSTU: 8.4 s at 1,024, 3.1 s at 128)
    return RecDataModule(source, max_len=max_len, batch_size=batch_size, eval_batch_size=EVAL_BATCH_SIZE,
                         length_grouping=length_grouping)


def method_settings(name: str, n_items: int) -> dict:
    """The shipped defaults of each method, plus its large-catalog path from ``LARGE_CATALOG`` items on."""
    shipped = {
        "exp_sft": {"lam": 1.0},
        "asft": {"lam": 1.0},
        "online_dpo": {"pair_source": "reward_model", "pair_policy": "current"},
        "rs_dpo": {"pair_source": "reward_model", "pair_policy": "reference"},
    }.get(name, {})
    if n_items < LARGE_CATALOG:
        return shipped
    sampled = {"softmax": "sampled", "num_negatives": NUM_NEGATIVES}
    large = {
        "sft": sampled,
        "exp_sft": sampled,
        "linear_sft": sampled,
        "asft": {**sampled, "score_chunk_size": CHUNK},  # b(s) is an expectation over the catalog
        "dpo": {"score_chunk_size": CHUNK},
        "online_dpo": {"score_chunk_size": CHUNK},
        "rs_dpo": {"score_chunk_size": CHUNK},
        "ppo": {"score_chunk_size": CHUNK, "kl_estimator": "k3"},
        "reward_model": {"score_chunk_size": CHUNK},
    }
    return {**shipped, **large.get(name, {})}


class Step:
    """One method set up for timed training steps with Fabric (no Trainer), running the method's own
    ``training_step``; for automatic-optimisation methods also the backward and optimiser step that
    Lightning's loop would add. Fabric has no LR schedulers: all methods train at a constant rate."""

    def __init__(self, module: L.LightningModule, device: str = "cpu", lr: float = 1e-3,
                 precision: str = "32-true") -> None:
        module.lr_schedulers = lambda: None  # what PPO's manual loop asks for; None = constant rate
        self.fabric = L.Fabric(accelerator=device, devices=1, precision=precision)
        opt = torch.optim.AdamW(module.parameters(), lr=lr)
        self.module, self.opt = self.fabric.setup(module, opt)
        self.automatic = module.automatic_optimization
        self.module.train()

    def __call__(self, batch: dict[str, torch.Tensor], batch_idx: int) -> float:
        """Seconds of one full training step on ``batch``."""
        batch = self.fabric.to_device(batch)
        if self.fabric.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = self.module.training_step(batch, batch_idx)
        if self.automatic:
            self.opt.zero_grad(set_to_none=True)
            self.fabric.backward(loss)
            self.opt.step()
        if self.fabric.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def method_modules(dm: RecDataModule, common: dict, workdir: Path, names=METHODS) -> dict[str, L.LightningModule]:
    """The methods from the same initial weights (each with its shipped defaults), the reward-model methods
    with reward models randomly initialised (their biases from the data, so pairs are not all ties; rs_dpo
    an ensemble of two): trained ones cost the same."""
    train = dm.training_interactions()
    rm_paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        rm = RewardModel(**common, **method_settings("reward_model", dm.n_items))
        rm.init_biases(train.item, train.rating)
        rm_paths.append(str(save_checkpoint(rm, workdir / f"reward_model_{seed}.ckpt")))
    torch.manual_seed(0)
    sft = SFT(**common, **method_settings("sft", dm.n_items))
    pre_path = save_checkpoint(sft, workdir / "policy.ckpt")
    post = dict(common, init_from=str(pre_path))
    classes = {"sft": SFT, "exp_sft": ExpSFT, "linear_sft": LinearSFT, "asft": ASFT, "dpo": DPO, "online_dpo": DPO,
               "rs_dpo": DPO, "ppo": PPO, "reward_model": RewardModel}
    modules = {}
    for name in names:
        kw = dict(post, **method_settings(name, dm.n_items))
        if name == "rs_dpo":
            kw["reward_ensemble"] = rm_paths
        elif name in ("asft", "dpo", "online_dpo", "ppo"):
            kw["reward_model"] = rm_paths[0]
        modules[name] = sft if name == "sft" else classes[name](**kw)
    return modules


def method_steps(dm: RecDataModule, common: dict, device: str, names=METHODS) -> dict[str, Step]:
    with tempfile.TemporaryDirectory(prefix="recpost-bench-") as workdir:
        return {name: Step(module, device) for name, module in method_modules(dm, common, Path(workdir), names).items()}


def batches(dm: RecDataModule) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches forever (a new shuffled epoch whenever one ends)."""
    while True:
        yield from dm.train_dataloader()


def interleaved_step_seconds(
    steps: dict[str, Step], stream: Iterator[dict[str, torch.Tensor]], repetitions: int
) -> tuple[dict[str, list[float]], list[dict[str, torch.Tensor]]]:
    """Seconds per step of every method, ``repetitions`` times, each repetition on one batch with the
    methods in a rotating order (no method always runs first, after another, or on a cold cache).

    Returns ``({method: [seconds per repetition]}, [the batches timed])``.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    timed_batches = []
    for i in range(repetitions + WARMUP_REPETITIONS):
        batch = next(stream)
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = steps[name](batch, i)
            if i >= WARMUP_REPETITIONS:
                times[name].append(seconds)
        if i >= WARMUP_REPETITIONS:
            timed_batches.append(batch)
    return times, timed_batches


def epoch_seconds(module: L.LightningModule, dm: RecDataModule, epochs: int, device: str = "cpu") -> Timer:
    """Train ``module`` for ``epochs`` through Lightning's Trainer (each epoch followed by a validation)."""
    timer = Timer()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    return timer
