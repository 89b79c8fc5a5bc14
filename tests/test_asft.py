"""Advantage-weighted SFT: the baseline b(s) (the reward model's expected rating under the reference),
a hand-computed loss, and its limits (a constant baseline is ExpSFT, lam -> inf is SFT)."""

from __future__ import annotations

import math

import pytest
import torch

from recpost.models.checkpoint import save_checkpoint
from recpost.core.errors import RecpostError
from recpost.methods import ASFT, SFT, ExpSFT, RewardModel
from recpost.methods.asft import expected_under_policy
from recpost.methods.losses import exp_reward_weights, weighted_mean
from recpost.methods.policy import state_log_probs
from tests.helpers import assert_same_loss_and_gradients, build, pretrained_checkpoint, reward_model_checkpoint, tiny_datamodule


@pytest.fixture
def setup(tmp_path):
    """(datamodule, pretrained checkpoint, trained reward-model checkpoint, a batch)."""
    dm = tiny_datamodule(tmp_path)
    pre = pretrained_checkpoint(dm, tmp_path / "pre.ckpt")
    return dm, pre, reward_model_checkpoint(dm, tmp_path / "rm.ckpt"), dm.train_batch(list(range(32)))


def constant_reward_model(dm, path, rating: float):
    """A reward-model checkpoint that predicts ``rating`` for every item after every history."""
    rm = build(RewardModel, dm)
    with torch.no_grad():
        rm.head.bias.fill_(rating)
        rm.head.user_weight.zero_()
    return save_checkpoint(rm, path)


def test_the_baseline_of_a_hand_made_catalog_is_the_reference_average_of_the_rewards():
    # 2 states over items 1..3 (column 0: padding). State 0 has had item 3: pi = (1, 2) / 3 on items 1, 2;
    # state 1 has had nothing: pi = (1, 2, 3) / 6.
    logits = torch.log(torch.tensor([[1.0, 1.0, 2.0, 3.0], [1.0, 1.0, 2.0, 3.0]]))
    values = torch.tensor([[9.0, 3.0, 6.0, 100.0], [9.0, 3.0, 6.0, 12.0]])
    history = torch.tensor([[0, 3], [0, 0]])
    for chunk in (4, 1, 3):
        b = expected_under_policy(lambda c: logits[:, c], lambda c: values[:, c], history, 4, chunk)
        assert b.tolist() == pytest.approx([(3 + 2 * 6) / 3, (3 + 2 * 6 + 3 * 12) / 6], rel=1e-6)


def test_a_tiny_loss_matches_the_hand_computed_value():
    # the two states above, logged targets rated 3 and 10 (b = 5 and 8.5: A = -2, 1.5), lam = 0.5,
    # cross-entropies 1 and 2: unnormalised weights e^-4, e^3
    logits = torch.log(torch.tensor([[1.0, 1.0, 2.0, 3.0]] * 2))
    values = torch.tensor([[9.0, 3.0, 6.0, 100.0], [9.0, 3.0, 6.0, 12.0]])
    b = expected_under_policy(lambda c: logits[:, c], lambda c: values[:, c], torch.tensor([[0, 3], [0, 0]]), 4, 2)
    ce = torch.tensor([1.0, 2.0])
    w = exp_reward_weights(torch.tensor([3.0, 10.0]) - b, lam=0.5, normalize="none")
    assert weighted_mean(ce, w).item() == pytest.approx((math.exp(-4) * 1 + math.exp(3) * 2) / 2, rel=1e-5)
    w = exp_reward_weights(torch.tensor([3.0, 10.0]) - b, lam=0.5)
    mean = (math.exp(-4) + math.exp(3)) / 2
    assert weighted_mean(ce, w).item() == pytest.approx((math.exp(-4) + 2 * math.exp(3)) / 2 / mean, rel=1e-5)


@pytest.mark.parametrize("chunk", [None, 7])
def test_the_baseline_is_the_reward_models_expectation_under_the_reference_over_unseen_items(setup, chunk):
    dm, pre, rm, batch = setup
    module = build(ASFT, dm, init_from=str(pre), reward_model=str(rm), score_chunk_size=chunk)
    states = batch["next_items"] > 0
    items, ratings, times = batch["input_items"], batch["input_ratings"], batch["input_timestamps"]
    logp, _ = state_log_probs(module.reference, items, ratings, states, True, batch["earlier_items"], times)
    rewards = module.reward_model.rewards_at(items, ratings, states, None, times)  # [N, V + 1]
    dense = (logp.exp() * rewards).sum(dim=1)
    assert torch.allclose(module.baseline(batch, states), dense, rtol=1e-5)


@pytest.mark.parametrize("norm", ["batch_mean", "fixed"])
def test_a_constant_baseline_is_exp_sft(setup, tmp_path, norm):
    dm, pre, _, batch = setup
    rm = constant_reward_model(dm, tmp_path / "constant.ckpt", 3.0)
    asft = build(ASFT, dm, init_from=str(pre), reward_model=str(rm), lam=0.5, weight_norm=norm, advantage_max=2.0)
    exp = build(ExpSFT, dm, init_from=str(pre), lam=0.5, weight_norm=norm, reward_max=5.0)
    assert torch.allclose(asft.baseline(batch, batch["next_items"] > 0), torch.tensor(3.0))
    results = []
    for module in (exp, asft):
        torch.manual_seed(0)  # the same dropout draws
        loss, _ = module.training_loss(batch)
        loss.backward()
        results.append((loss.item(), [p.grad for p in module.parameters()]))
    # equal up to the rounding of b(s) = sum p * 3 / sum p (~1e-7)
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for g_exp, g_asft in zip(results[0][1], results[1][1]):
        assert torch.allclose(g_exp, g_asft, rtol=1e-5, atol=1e-6 * g_exp.abs().max().item())


def test_lambda_to_infinity_is_sft(setup):
    dm, pre, rm, batch = setup
    asft = build(ASFT, dm, init_from=str(pre), reward_model=str(rm), lam=1e8)
    assert_same_loss_and_gradients(build(SFT, dm, init_from=str(pre)), asft, batch, seed=0)


def test_the_reference_stays_the_initial_policy_and_the_diagnostics_are_finite(setup):
    dm, pre, rm, batch = setup
    module = build(ASFT, dm, init_from=str(pre), reward_model=str(rm), lam=0.5)
    before = module.reference.item_emb.weight.clone()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    loss, logs = module.training_loss(batch)
    loss.backward()
    opt.step()
    assert torch.equal(module.reference.item_emb.weight, before)
    assert not torch.equal(module.backbone.item_emb.weight, before)
    assert all(torch.isfinite(v) for v in logs.values()) and {"baseline", "advantage", "ess"} <= set(logs)
    assert "rm_reward@10" in module.extra_metric_names()


def test_the_bound_of_fixed_is_the_width_of_the_rating_scale(setup):
    dm, pre, rm, _ = setup
    module = build(ASFT, dm, init_from=str(pre), reward_model=str(rm), weight_norm="fixed")
    module.set_weight_bound_from(dm)
    assert module.weight_bound == 4.0


def test_without_a_reward_model_it_is_one_clear_error(setup):
    dm, pre, _, _ = setup
    assert ASFT.needs_reward_model({}) and ASFT.takes_reward_model
    with pytest.raises(RecpostError, match="ASFT needs model.reward_model"):
        build(ASFT, dm, init_from=str(pre))
