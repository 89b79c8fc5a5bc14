"""KTO on logged feedback: TRL's loss by hand, the reference point z0, the gradient's sign, the settings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from recpost.core.errors import RecpostError
from recpost.methods import KTO
from recpost.methods.kto import kto_loss
from tests.helpers import build, pretrained_checkpoint, tiny_datamodule

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"


@pytest.fixture
def kto_setup(tmp_path):
    """(datamodule, pretrained checkpoint): KTO needs no reward model."""
    dm = tiny_datamodule(tmp_path)
    return dm, pretrained_checkpoint(dm, tmp_path / "pre.ckpt")


def _kto(kto_setup, **kw) -> KTO:
    dm, pre = kto_setup
    return build(KTO, dm, **{"init_from": str(pre), **kw})


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_the_loss_matches_hand_computed_values():
    policy, reference = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -1.0, -3.0])  # rho = 0.5, -1, 0
    desirable = torch.tensor([True, False, True])
    losses, rewards = kto_loss(policy, reference, desirable, z0=0.2, beta=0.5, desirable_weight=1.0,
                               undesirable_weight=2.0)
    assert losses.tolist() == pytest.approx([1 - _sigmoid(0.5 * (0.5 - 0.2)), 2 * (1 - _sigmoid(0.5 * (0.2 + 1.0))),
                                             1 - _sigmoid(0.5 * (0.0 - 0.2))])
    assert rewards.tolist() == pytest.approx([0.25, -0.5, 0.0])


def test_the_gradient_pushes_desirable_log_ratios_up_and_undesirable_ones_down():
    policy = torch.tensor([-1.0, -2.0, -3.0, -0.5], requires_grad=True)
    desirable = torch.tensor([True, False, True, False])
    losses, _ = kto_loss(policy, torch.full((4,), -2.0), desirable, z0=0.3, beta=0.1)
    losses.mean().backward()
    descent = -policy.grad  # the direction a gradient step moves each log-probability
    assert (descent[desirable] > 0).all() and (descent[~desirable] < 0).all()


def test_at_the_start_the_loss_is_half_the_weights_and_z0_is_zero(kto_setup):
    # policy == reference: every log-ratio is 0, so z0 = 0 and each example's loss is weight * (1 - sigmoid(0)).
    kto = _kto(kto_setup, desirable_weight=1.0, undesirable_weight=3.0)
    batch = kto_setup[0].train_batch(list(range(32)))
    loss, logs = kto.training_loss(batch)
    n_d, n_u = logs["count/desirable"].item(), logs["count/undesirable"].item()
    ratings = batch["next_ratings"][batch["next_items"] > 0]
    assert n_d == (ratings >= 4).sum().item() and n_u == (ratings <= 2).sum().item() and n_d > 0 and n_u > 0
    assert logs["kl"].item() == 0.0
    assert loss.item() == pytest.approx(0.5 * (n_d + 3.0 * n_u) / (n_d + n_u), rel=1e-5)


@pytest.mark.parametrize("sharper", ["reference", "policy"])
def test_the_loss_and_z0_equal_a_dense_computation(kto_setup, sharper):
    # Dense masked log-softmax over the catalog, mismatched pairs by hand: the item logged at the same position of
    # the previous window; z0 = their mean log-ratio, clamped at 0, without gradient. A sharper reference puts
    # other users' items below the policy (z0 > 0); a sharper policy puts them above (the clamp gives z0 = 0).
    kto = _kto(kto_setup, beta=0.3, undesirable_weight=1.5)
    with torch.no_grad():
        getattr(kto, "reference" if sharper == "reference" else "backbone").item_emb.weight.mul_(4.0)
    batch = kto_setup[0].train_batch(list(range(32)))
    loss, logs = kto.training_loss(batch)

    liked, ratings, items = batch["next_liked"], batch["next_ratings"], batch["next_items"]
    states = (items > 0) & (liked | (ratings <= 2.0))
    logp, _ = kto.log_probs(batch, states)  # [P, V + 1], history masked
    with torch.no_grad():
        ref, _ = kto.log_probs(batch, states, reference=True)
    own, other = items[states], items.roll(1, dims=0)[states]
    rho_other = (logp.detach() - ref).gather(1, other[:, None]).squeeze(1)
    valid = (other > 0) & torch.isfinite(rho_other)
    raw = rho_other[valid].mean().item()
    assert valid.sum() > 5 and (raw > 0.01 if sharper == "reference" else raw < -0.01)
    z0 = max(raw, 0.0)
    assert logs["kl"].item() == pytest.approx(z0, rel=1e-4, abs=1e-7)
    rho = (logp - ref).gather(1, own[:, None]).squeeze(1)
    desirable = liked[states]
    expected = torch.where(desirable, 1 - torch.sigmoid(0.3 * (rho - z0)), 1.5 * (1 - torch.sigmoid(0.3 * (z0 - rho))))
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_a_few_steps_raise_desirable_log_ratios_and_lower_undesirable_ones(kto_setup):
    torch.manual_seed(0)
    kto = _kto(kto_setup, beta=0.1)
    batch = kto_setup[0].train_batch(list(range(64)))
    opt = torch.optim.Adam(kto.parameters(), lr=1e-2)
    for _ in range(3):
        loss, _ = kto.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, logs = kto.training_loss(batch)
    assert logs["rewards/chosen"] > 0 > logs["rewards/rejected"]


def test_a_batch_without_examples_has_zero_loss_that_reaches_every_parameter(kto_setup):
    kto = _kto(kto_setup)
    batch = kto_setup[0].train_batch(list(range(32)))
    batch["next_ratings"] = torch.where(batch["next_items"] > 0, 3.0, 0.0)  # all neutral: neither kind
    batch["next_liked"] = torch.zeros_like(batch["next_liked"])
    loss, logs = kto.training_loss(batch)
    loss.backward()
    assert loss.item() == 0.0 and logs["count/desirable"].item() == 0 and logs["count/undesirable"].item() == 0
    assert all(p.grad is not None for p in kto.backbone.parameters())


@pytest.mark.parametrize(("kw", "message"), [
    ({"beta": 0.0}, r"^model.beta must be > 0 \(got 0.0\); TRL's default is 0.1"),
    ({"beta": -1.0}, r"^model.beta must be > 0 \(got -1.0\)"),
    ({"desirable_weight": 0.0}, "model.desirable_weight must be > 0"),
    ({"undesirable_weight": -1.0}, "model.undesirable_weight must be > 0"),
    ({"undesirable_max_rating": float("inf")}, "model.undesirable_max_rating must be a finite number"),
])
def test_bad_settings_are_one_clear_error(kto_setup, kw, message):
    with pytest.raises(RecpostError, match=message) as info:
        _kto(kto_setup, **kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("worst", "message"), [
    (4.0, "model.undesirable_max_rating 4 must be below data.liked_threshold 4"),
    (0.5, "model.undesirable_max_rating 0.5 is below the data's lowest rating 1: no target would be undesirable"),
])
def test_thresholds_the_data_cannot_honour_are_refused_before_training(kto_setup, worst, message):
    with pytest.raises(RecpostError, match=message):
        _kto(kto_setup, undesirable_max_rating=worst).check_thresholds(kto_setup[0])


def test_kto_needs_no_reward_model(kto_setup):
    assert not KTO.needs_reward_model({}) and KTO.takes_reward_model
    assert "reward_model" not in _kto(kto_setup)._frozen


def test_the_kto_config_holds_trls_defaults_and_valid_settings():
    model = yaml.safe_load((CONFIGS / "kto.yaml").read_text())["model"]
    assert model["class_path"] == "recpost.methods.KTO"
    args = model["init_args"]
    assert (args["beta"], args["desirable_weight"], args["undesirable_weight"]) == (0.1, 1.0, 1.0)  # TRL KTOConfig
    KTO.check_settings(**args)
