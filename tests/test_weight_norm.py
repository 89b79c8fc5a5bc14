"""Weight normalisation of the reward-weighted SFT methods (``weight_norm: none | batch_mean | fixed``):
hand-computed values, the bias of a batch-mean normaliser on small batches, where ``fixed`` takes its
bound from, and the global batch mean under DDP (2 processes train exactly as 1)."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from recpost.core.errors import RecpostError
from recpost.methods import ExpSFT, LinearSFT
from recpost.methods.losses import exp_reward_weights, linear_reward_weights, weighted_mean
from recpost.models import BackboneConfig
from tests.helpers import build, tiny_datamodule

E = math.e
NO_DROPOUT = BackboneConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0)


# ----------------------------------------------------------------------------------- hand-computed values
def test_exp_weights_of_each_normalisation_match_hand_computed_values():
    r = torch.tensor([1.0, 2.0, 5.0])
    none = exp_reward_weights(r, lam=1.0, normalize="none")
    assert none.tolist() == pytest.approx([E, E**2, E**5], rel=1e-6)
    mean = (E + E**2 + E**5) / 3
    assert exp_reward_weights(r, lam=1.0).tolist() == pytest.approx([E / mean, E**2 / mean, E**5 / mean], rel=1e-6)
    fixed = exp_reward_weights(r, lam=1.0, normalize="fixed", reward_max=5.0)
    assert fixed.tolist() == pytest.approx([E**-4, E**-3, 1.0], rel=1e-6)


def test_linear_weights_of_each_normalisation_match_hand_computed_values():
    r = torch.tensor([1.0, 2.0, 5.0])
    assert linear_reward_weights(r, "none").tolist() == pytest.approx([1.0, 2.0, 5.0])
    assert linear_reward_weights(r, "batch_mean").tolist() == pytest.approx([0.375, 0.75, 1.875])  # mean 8/3
    assert linear_reward_weights(r, "fixed", reward_max=5.0).tolist() == pytest.approx([0.2, 0.4, 1.0])


def test_fixed_exp_weights_stay_finite_and_at_most_one_for_tiny_lambda():
    w = exp_reward_weights(torch.tensor([1.0, 4.0, 5.0]), lam=1e-3, normalize="fixed", reward_max=5.0)
    assert torch.isfinite(w).all() and w.tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_fixed_normalisation_without_a_bound_is_one_clear_error():
    with pytest.raises(RecpostError, match="weight_norm: fixed needs the largest possible reward"):
        exp_reward_weights(torch.tensor([1.0]), lam=1.0, normalize="fixed")


def test_all_zero_linear_rewards_give_zero_weights_not_nan():
    assert linear_reward_weights(torch.zeros(3), "batch_mean").tolist() == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------- bias on small batches
def _optimal_share_of_the_better_action(weights_of, batch_size: int, pi_beta: float = 0.5) -> float:
    """One state, two actions with rewards 1 (drawn w.p. ``1 - pi_beta``) and 5 (w.p. ``pi_beta``), batches of
    ``batch_size`` i.i.d. draws: the probability the minimiser of the expected loss ``E[mean_i w_i CE(a_i)]``
    gives the better action, ``E[W_5] / (E[W_1] + E[W_5])`` with ``W_a`` the batch's total weight on ``a``
    (exact: every batch composition, by its binomial probability)."""
    total = np.zeros(2)
    for k in range(batch_size + 1):  # k draws of the better action
        p = math.comb(batch_size, k) * pi_beta**k * (1 - pi_beta) ** (batch_size - k)
        w = weights_of(torch.tensor([1.0] * (batch_size - k) + [5.0] * k))
        total += p * np.array([w[: batch_size - k].sum().item(), w[batch_size - k:].sum().item()])
    return total[1] / total.sum()


def test_batch_mean_biases_the_optimum_on_small_batches_and_fixed_does_not():
    lam = 1.0
    target = E**5 / (E**1 + E**5)  # pi_beta * exp(r / lam), normalised: the population optimum
    fixed = _optimal_share_of_the_better_action(lambda r: exp_reward_weights(r, lam, "fixed", reward_max=5.0), 2)
    small = _optimal_share_of_the_better_action(lambda r: exp_reward_weights(r, lam, "batch_mean"), 2)
    large = _optimal_share_of_the_better_action(lambda r: exp_reward_weights(r, lam, "batch_mean"), 256)
    assert fixed == pytest.approx(target, abs=1e-6)
    # batch of 2: a batch of two equal actions gets weights 1, 1 whatever the reward: 0.74 instead of 0.98
    assert small == pytest.approx((0.25 * 2 + 0.5 * 2 * E**4 / (1 + E**4)) / 2, abs=1e-6)
    assert target - small > 0.2
    assert abs(target - large) < abs(target - small) / 20  # the bias shrinks as batches grow


def test_linear_batch_mean_is_biased_on_small_batches_and_fixed_is_not():
    target = 5.0 / 6.0  # pi_beta * r, normalised
    fixed = _optimal_share_of_the_better_action(lambda r: linear_reward_weights(r, "fixed", reward_max=5.0), 2)
    small = _optimal_share_of_the_better_action(lambda r: linear_reward_weights(r, "batch_mean"), 2)
    assert fixed == pytest.approx(target, abs=1e-6)
    assert target - small > 0.05


# ----------------------------------------------------------------------------------- the bound of `fixed`
@pytest.mark.parametrize(("transform", "reward_max"), [("identity", 5.0), ("minmax", 1.0)])
def test_fixed_reads_the_top_of_the_rating_scale_from_the_data_at_fit_start(tmp_path, transform, reward_max):
    dm = tiny_datamodule(tmp_path)
    dm.reward_transform = transform
    module = build(ExpSFT, dm, weight_norm="fixed")
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    assert module.weight_bound == reward_max


def test_the_bound_of_fixed_follows_each_method(tmp_path):
    dm = tiny_datamodule(tmp_path)
    assert dm.rating_range == (1.0, 5.0) and dm.reward_range == (1.0, 5.0)
    module = build(LinearSFT, dm, weight_norm="fixed")
    module.set_weight_bound_from(dm)
    assert module.weight_bound == 5.0
    assert build(ExpSFT, dm, weight_norm="fixed", reward_max=4.0).weight_bound == 4.0  # a setting wins


def test_fixed_without_data_or_setting_is_one_clear_error(tmp_path):
    dm = tiny_datamodule(tmp_path)
    module = build(ExpSFT, dm, weight_norm="fixed")
    with pytest.raises(RecpostError, match="set model.reward_max"):
        module.training_loss(dm.train_batch(list(range(8))))


def test_an_unknown_weight_norm_is_rejected(tmp_path):
    with pytest.raises(RecpostError, match="model.weight_norm must be one of batch_mean, none, fixed"):
        build(LinearSFT, tiny_datamodule(tmp_path), weight_norm="sum")


# ----------------------------------------------------------------------------------- DDP: the global batch
def _rank_loss_and_grads(rank: int, folder: str, cls, dm, batch) -> None:
    """One of 2 gloo processes (forked: ``dm`` and ``batch`` are the parent's): the loss and gradients of its
    part of the union ``batch``, saved to a file."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        rows = slice(0, 7) if rank == 0 else slice(7, 24)  # uneven: different target counts per process
        module = build(cls, dm, backbone=NO_DROPOUT)
        loss, _ = module.training_loss({k: v[rows] for k, v in batch.items()})
        loss.backward()
        grads = [p.grad.clone() for p in module.parameters()]
        for g in grads:  # what DDP does: the mean of the processes' gradients
            dist.all_reduce(g)
            g /= 2
        torch.save({"loss": loss.detach(), "grads": grads}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("cls", [ExpSFT, LinearSFT])
def test_batch_mean_under_ddp_equals_one_process_on_the_union_batch(tmp_path, cls):
    dm = tiny_datamodule(tmp_path / "data")  # built (and cached) once, before the processes fork
    batch = dm.train_batch(list(range(24)))
    module = build(cls, dm, backbone=NO_DROPOUT)
    loss, _ = module.training_loss(batch)
    loss.backward()
    torch.multiprocessing.start_processes(_rank_loss_and_grads, args=(str(tmp_path), cls, dm, batch), nprocs=2,
                                          start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # each process's loss is its share of the global mean: their mean is the union's loss
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(loss.item(), rel=1e-5)
    for g_union, g_ddp in zip((p.grad for p in module.parameters()), ranks[0]["grads"]):
        assert torch.allclose(g_union, g_ddp, rtol=1e-4, atol=1e-7)


def test_the_weighted_mean_over_processes_is_the_global_mean():
    values, weights = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 2.0])
    one_process = weighted_mean(values, weights)
    # this process holds 3 of 4 targets; 2 processes: sum * 2 / 4
    two = weighted_mean(values, weights, gather=lambda t: torch.stack([t, torch.ones_like(t)]))
    assert one_process.item() == pytest.approx(9 / 3) and two.item() == pytest.approx(9 * 2 / 4)
