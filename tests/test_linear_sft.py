"""Linear reward-weighted SFT (``w = r``): the weights, its limits, and the refusal of negative rewards."""

from __future__ import annotations

import pytest
import torch

from recpost.core.errors import RecpostError
from recpost.methods import SFT, LinearSFT
from recpost.models import BackboneConfig
from tests.helpers import assert_same_loss_and_gradients, build, tiny_datamodule

NO_DROPOUT = BackboneConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0)


@pytest.fixture
def datamodule(tmp_path):
    return tiny_datamodule(tmp_path)


@pytest.mark.parametrize("norm", ["none", "batch_mean", "fixed"])
def test_the_loss_is_the_cross_entropy_weighted_by_the_reward(datamodule, norm):
    batch = datamodule.train_batch(list(range(32)))
    module = build(LinearSFT, datamodule, weight_norm=norm, reward_max=5.0, backbone=NO_DROPOUT)
    loss, logs = module.training_loss(batch)
    ce, rewards = module.next_item_cross_entropy(batch)
    scale = {"none": 1.0, "batch_mean": rewards.mean(), "fixed": 5.0}[norm]
    assert loss.item() == pytest.approx((rewards / scale * ce).mean().item(), rel=1e-5)
    assert logs["weight_max"].item() == pytest.approx((rewards.max() / scale).item(), rel=1e-5)


@pytest.mark.parametrize("norm", ["batch_mean", "fixed"])
def test_equal_rewards_are_plain_sft(datamodule, norm):
    batch = datamodule.train_batch(list(range(32)))
    batch["next_rewards"] = torch.where(batch["next_items"] > 0, 3.0, 0.0)
    assert_same_loss_and_gradients(build(SFT, datamodule), build(LinearSFT, datamodule, weight_norm=norm, reward_max=3.0),
                                   batch, seed=0)


def test_the_lowest_minmax_rating_gets_weight_zero(datamodule):
    datamodule.reward_transform = "minmax"
    batch = datamodule.train_batch(list(range(32)))
    _, logs = build(LinearSFT, datamodule, weight_norm="none").training_loss(batch)
    assert logs["weight_min"].item() == 0.0 and logs["weight_max"].item() == 1.0


def test_liked_targets_carry_more_than_their_share_of_the_loss(datamodule):
    batch = datamodule.train_batch(list(range(32)))
    _, logs = build(LinearSFT, datamodule).training_loss(batch)
    assert logs["weight_mean"].item() == pytest.approx(1.0, rel=1e-5)
    assert logs["liked_loss_share"] > batch["next_liked"][batch["next_items"] > 0].float().mean()


def test_centered_rewards_are_refused_with_the_transforms_that_work(datamodule):
    datamodule.reward_transform = "centered"
    batch = datamodule.train_batch(list(range(32)))
    with pytest.raises(RecpostError, match="need rewards >= 0.*use data.reward_transform: identity or minmax"):
        build(LinearSFT, datamodule).training_loss(batch)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf")])
def test_a_non_positive_reward_max_is_rejected(datamodule, value):
    with pytest.raises(RecpostError, match="model.reward_max must be > 0 and finite"):
        build(LinearSFT, datamodule, weight_norm="fixed", reward_max=value)
