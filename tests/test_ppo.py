"""PPO against a frozen reward model: advantages, clipping, the first ratio, KL, bad settings, a real fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from recpost.core.errors import RecpostError
from recpost.methods import PPO
from recpost.methods.policy import state_history
from recpost.methods.ppo import clipped_surrogate, group_advantages
from tests.helpers import (
    build,
    last_metrics,
    pretrained_checkpoint,
    recpost,
    reward_model_checkpoint,
    tiny_datamodule,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "method" / "ppo.yaml"


def _ppo(rlhf_setup, **kw) -> PPO:
    dm, pre, rm = rlhf_setup
    return build(PPO, dm, **{"init_from": str(pre), "reward_model": str(rm), "k": 4, **kw})


def test_group_advantage_is_the_reward_minus_the_other_samples_mean():
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0]]))
    assert adv.tolist() == [[-1.5, 0.0, 1.5]]
    scaled = group_advantages(torch.tensor([[1.0, 2.0, 3.0]]), scale="group")  # group std is 1
    assert scaled[0].tolist() == pytest.approx([-1.5 / (1 + 1e-4), 0.0, 1.5 / (1 + 1e-4)])


def test_clipped_surrogate_matches_hand_computed_values():
    logp_old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = clipped_surrogate(logp, logp_old, adv, clip_range=0.2)
    # per sample max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5; max(1.1, 1.1) = 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert stats["policy/clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["policy/approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3)


def test_first_minibatch_of_a_rollout_has_ratio_exactly_one(rlhf_setup):
    ppo = _ppo(rlhf_setup, num_minibatches=2)
    batch = rlhf_setup[0].train_batch(list(range(32)))
    roll = ppo.rollout(batch)
    first = ppo._minibatches(len(roll.states), shuffle=False, device=roll.states.device)[0]
    _, stats, ratio = ppo.minibatch_loss(batch, roll, first)
    assert torch.equal(ratio, torch.ones_like(ratio))
    assert stats["policy/clipfrac"].item() == 0.0 and stats["policy/approxkl"].item() == 0.0


def test_the_policy_starts_at_the_reference(rlhf_setup):
    ppo = _ppo(rlhf_setup)
    roll = ppo.rollout(rlhf_setup[0].train_batch(list(range(32))))
    assert roll.stats["objective/kl"].item() == 0.0
    assert roll.stats["objective/entropy"].item() > 0
    assert torch.isfinite(roll.advantages).all() and roll.actions.min() > 0


def test_sampled_items_are_never_in_the_states_history(rlhf_setup):
    ppo = _ppo(rlhf_setup, k=6)
    batch = rlhf_setup[0].train_batch(list(range(64)))
    roll = ppo.rollout(batch)
    history = state_history(batch["input_items"], roll.states, batch["earlier_items"])  # [N, H + L]
    assert not (roll.actions[:, :, None] == history[:, None, :]).any()


def test_items_the_user_had_before_the_window_have_probability_zero_at_every_state(rlhf_setup):
    # A window of a long sequence starts after the user's first items: those are part of every state's
    # history (evaluation masks them too), so the policy must never sample or pair them.
    dm = rlhf_setup[0]
    ppo = _ppo(rlhf_setup)
    batch = dm.train_batch(list(range(len(dm.train_windows()[0]))))
    assert (batch["earlier_items"] > 0).any()
    states = ppo.states(batch)
    logp, _ = ppo.log_probs(batch, states)  # [N, V + 1]
    earlier = batch["earlier_items"][states.nonzero()[:, 0]]  # [N, H]
    assert torch.isinf(logp.gather(1, earlier)).all()


def test_sampled_kl_estimators_are_subtracted_from_the_rm_reward(rlhf_setup):
    torch.manual_seed(0)
    ppo = _ppo(rlhf_setup, kl_estimator="k1", kl_coef=0.5)
    with torch.no_grad():  # move the policy away from the reference so the penalty is not zero
        ppo.backbone.item_emb.weight.mul_(3.0)
    batch = rlhf_setup[0].train_batch(list(range(32)))
    roll = ppo.rollout(batch)
    ref_logp, _ = ppo.log_probs(batch, roll.states, reference=True)
    rm_reward = ppo._frozen["reward_model"].rewards_at(batch["input_items"], batch["input_ratings"], roll.states)
    expected = rm_reward.gather(1, roll.actions) - 0.5 * (roll.logp_old - ref_logp.gather(1, roll.actions))
    assert torch.allclose(roll.returns, expected, atol=1e-5)
    assert roll.ref_logp is None  # nothing to add to the loss


def test_the_k3_estimator_is_a_ratio_weighted_loss_term_not_a_reward(rlhf_setup):
    # kl_estimator: k3 leaves the RM reward alone and adds kl_coef * mean(pi / pi_old * k3) to the loss (the form
    # whose expected gradient is that of KL(pi || pi_ref): tests/test_kl_gradient.py).
    from recpost.methods.policy import kl_k3

    ppo = _ppo(rlhf_setup, kl_estimator="k3", kl_coef=0.5)
    with torch.no_grad():
        ppo.backbone.item_emb.weight.mul_(3.0)
    batch = rlhf_setup[0].train_batch(list(range(32)))
    roll = ppo.rollout(batch)
    rm_reward = ppo._frozen["reward_model"].rewards_at(batch["input_items"], batch["input_ratings"], roll.states)
    assert torch.allclose(roll.returns, rm_reward.gather(1, roll.actions), atol=1e-5)
    loss, stats, ratio = ppo.minibatch_loss(batch, roll, None)
    ref_logp, _ = ppo.log_probs(batch, roll.states, reference=True)
    k3 = kl_k3(roll.logp_old, ref_logp.gather(1, roll.actions))
    assert k3.mean() > 0.01
    assert loss.item() == pytest.approx(stats["loss/policy"].item() + 0.5 * (ratio * k3).mean().item(), rel=1e-4)


def test_exact_kl_term_pulls_the_policy_back_to_the_reference(rlhf_setup):
    ppo = _ppo(rlhf_setup, kl_coef=1.0)
    with torch.no_grad():
        ppo.backbone.item_emb.weight.mul_(3.0)
    batch = rlhf_setup[0].train_batch(list(range(32)))
    roll = ppo.rollout(batch)
    roll.advantages.zero_()  # only the KL term remains
    loss, _, _ = ppo.minibatch_loss(batch, roll, torch.arange(32))
    assert loss.item() == pytest.approx(roll.stats["objective/kl"].item(), rel=1e-5) and loss.item() > 0


def test_value_baseline_starts_at_the_mean_reward(rlhf_setup):
    ppo = _ppo(rlhf_setup, baseline="value", k=1)
    batch = rlhf_setup[0].train_batch(list(range(32)))
    roll = ppo.rollout(batch)
    assert roll.values is not None and torch.allclose(roll.values, roll.returns.mean().expand_as(roll.values))
    loss, stats, _ = ppo.minibatch_loss(batch, roll, torch.arange(32))
    assert torch.isfinite(loss) and "loss/value" in stats and "value/clipfrac" in stats


def test_adaptive_kl_controller_raises_the_coefficient_above_target(rlhf_setup):
    ppo = _ppo(rlhf_setup, kl_coef=0.1, target_kl=0.01, kl_horizon=100)
    ppo._adapt_kl_coef(torch.tensor(1.0), n_states=50)  # error clipped to +0.2 -> x (1 + 0.2 * 50 / 100)
    assert ppo.kl_coef_value.item() == pytest.approx(0.11)
    ppo._adapt_kl_coef(torch.tensor(0.0), n_states=50)  # -> x (1 - 0.2 * 0.5)
    assert ppo.kl_coef_value.item() == pytest.approx(0.099)


def test_updates_raise_the_expected_rm_reward(rlhf_setup):
    torch.manual_seed(0)
    ppo = _ppo(rlhf_setup, kl_coef=0.0, k=8, lr=0.05)
    batch = rlhf_setup[0].train_batch(list(range(64)))
    rm = ppo._frozen["reward_model"]

    def expected_reward() -> float:
        with torch.no_grad():
            logp, _ = ppo.log_probs(batch, batch["next_items"] > 0)
            rewards = rm.rewards_at(batch["input_items"], batch["input_ratings"], batch["next_items"] > 0)
            return (logp.exp() * rewards.masked_fill(torch.isinf(logp), 0.0)).sum(1).mean().item()

    before = expected_reward()
    opt = torch.optim.AdamW(ppo.parameters(), lr=0.05)
    for _ in range(5):
        roll = ppo.rollout(batch)
        loss, _, _ = ppo.minibatch_loss(batch, roll, torch.arange(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert expected_reward() > before + 0.01


@pytest.mark.parametrize("limit", [{"max_steps": 12, "max_epochs": 100}, {"max_epochs": 2}])
def test_a_cosine_schedule_ends_at_zero_after_the_last_optimiser_step(rlhf_setup, limit):
    # Each rollout takes ppo_epochs x num_minibatches optimiser steps: the schedule is sized and stepped
    # in optimiser steps, whether max_steps (which counts optimiser steps) or max_epochs ends the fit.
    import lightning as L

    dm = rlhf_setup[0]
    ppo = _ppo(rlhf_setup, lr_schedule="cosine", ppo_epochs=2, num_minibatches=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, **limit)
    trainer.fit(ppo, datamodule=dm)
    n_batches = math.ceil(len(dm.train_windows()[0]) / dm.batch_size)
    expected = limit.get("max_steps", n_batches * limit["max_epochs"] * 4)
    assert trainer.global_step == expected
    assert ppo.lr_schedulers().get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_reference_and_reward_model_are_frozen_unsaved_and_follow_device_moves(rlhf_setup):
    ppo = _ppo(rlhf_setup)
    assert all(not k.startswith(("reference", "reward_model", "_frozen")) for k in ppo.state_dict())
    frozen = [p for m in ppo._frozen.values() for p in m.parameters()]
    assert not any(p.requires_grad for p in frozen)
    assert not {id(p) for p in frozen} & {id(p) for p in ppo.parameters()}
    ppo.train()
    assert not any(m.training for m in ppo._frozen.values())
    ppo.double()
    assert all(p.dtype == torch.float64 for p in frozen)


@pytest.mark.parametrize(("kw", "message"), [
    ({"reward_model": None}, "PPO needs model.reward_model"),
    ({"k": 1}, "k must be >= 2 with baseline: group"),
    ({"clip_range": 0.0}, "clip_range must be > 0"),
    ({"kl_coef": -0.1}, "kl_coef must be >= 0"),
    ({"target_kl": 0.0}, "target_kl must be > 0"),
    ({"kl_estimator": "k1", "scale_rewards": "group"}, "k1 puts the KL in the reward, which scale_rewards: group would"),
])
def test_bad_settings_are_one_clear_error(rlhf_setup, kw, message):
    with pytest.raises(RecpostError, match=message):
        _ppo(rlhf_setup, **kw)


def test_a_reward_model_of_another_catalog_is_rejected(rlhf_setup, tmp_path):
    other = tiny_datamodule(tmp_path / "other", n_items=45, seed=1)
    rm = reward_model_checkpoint(other, tmp_path / "other_rm.ckpt", steps=0)
    with pytest.raises(RecpostError, match="another item catalog"):
        _ppo(rlhf_setup, reward_model=str(rm))


def test_a_missing_reward_model_file_is_rejected(rlhf_setup, tmp_path):
    with pytest.raises(RecpostError, match="checkpoint not found.*reward model is needed"):
        _ppo(rlhf_setup, reward_model=str(tmp_path / "nope.ckpt"))


@pytest.mark.slow
def test_recpost_fit_runs_ppo_and_logs_trl_metrics(tiny_config):
    dm = tiny_datamodule(tiny_config.parent)  # the same CSV as the config: the same catalog
    pre = pretrained_checkpoint(dm, tiny_config.parent / "pre.ckpt")
    rm = reward_model_checkpoint(dm, tiny_config.parent / "rm.ckpt")
    eval_rm = reward_model_checkpoint(dm, tiny_config.parent / "rm2.ckpt", seed=1)
    root = tiny_config.parent / "ppo"
    out = recpost("fit", "--config", str(tiny_config), "--config", str(CONFIG), "--model.init_args.init_from", str(pre),
                  "--model.init_args.reward_model", str(rm), "--model.init_args.eval_reward_model", str(eval_rm),
                  "--model.init_args.ppo_epochs", "2", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root))
    assert out.returncode == 0, out.stderr[-3000:]
    run, rows = last_metrics(root)
    train = [r for r in rows if r.get("train/loss")]
    for name in ("train/loss", "objective/rm_reward", "objective/kl", "objective/entropy", "policy/clipfrac",
                 "policy/approxkl", "loss/policy"):
        assert all(math.isfinite(float(r[name])) for r in train), name
    val = next(r for r in rows if r.get("val/ndcg@10"))
    assert math.isfinite(float(val["val/rm_reward@10"])) and math.isfinite(float(val["val/eval_rm_reward@10"]))
    assert (run.best_checkpoint).is_file()


def test_two_fits_with_the_same_seed_end_with_the_same_bits(rlhf_setup):
    """Every random draw of a PPO fit (sampling, data order) comes from the seed: two fits end bit-identical
    (for the same number of CPU threads; see the README on determinism)."""
    import lightning as L

    def fit() -> dict[str, torch.Tensor]:
        ppo = _ppo(rlhf_setup)
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(ppo, datamodule=rlhf_setup[0])
        return ppo.state_dict()

    first, second = fit(), fit()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.1])
def test_the_first_ppo_loss_and_gradient_equal_a_naive_computation_on_a_fixed_batch(rlhf_setup, entropy_coef):
    # Dense per-state masks built item by item, the full reference log-probs, the exact KL and entropy by
    # hand, with autograd: the fast path (index-list masks, the catalog terms a block of states at a time
    # with a hand-written gradient) gives the same loss and the same gradient.
    from recpost.methods.policy import entropy, exact_kl

    dm = rlhf_setup[0]
    ppo = _ppo(rlhf_setup, kl_coef=0.3, entropy_coef=entropy_coef)
    with torch.no_grad():
        ppo.backbone.item_emb.weight.mul_(2.0)  # policy != reference, so the KL term is not zero
    batch = dm.train_batch(list(range(len(dm.train_windows()[0]))))
    roll = ppo.rollout(batch)
    loss, _, _ = ppo.minibatch_loss(batch, roll, None)
    loss.backward()
    fast_grads = {name: p.grad.clone() for name, p in ppo.backbone.named_parameters() if p.grad is not None}
    ppo.zero_grad()

    def naive(backbone):
        hidden = backbone.encode(batch["input_items"], batch["input_ratings"], batch["input_timestamps"])
        rows = []
        for b, t in roll.states.nonzero().tolist():
            logits = backbone.score(hidden[b, t]).clone()
            had = set(batch["earlier_items"][b].tolist()) | set(batch["input_items"][b, : t + 1].tolist()) | {0}
            logits[sorted(had)] = float("-inf")
            rows.append(logits.log_softmax(-1))
        return torch.stack(rows)

    logp = naive(ppo.backbone)
    with torch.no_grad():
        ref = naive(ppo.reference)
    surrogate, _ = clipped_surrogate(logp.gather(1, roll.actions), roll.logp_old, roll.advantages, 0.2)
    expected = surrogate + 0.3 * exact_kl(logp, ref).mean() - entropy_coef * entropy(logp).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    assert fast_grads.keys() == {name for name, p in ppo.backbone.named_parameters() if p.grad is not None}
    for name, p in ppo.backbone.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_grpo_preset_is_trls_grpo_config_on_ppo():
    # TRL 1.10 GRPOConfig: num_generations 8, beta 0.0, epsilon 0.2, num_iterations 1, scale_rewards group;
    # the KL term (used when kl_coef > 0) is the ratio-weighted k3, which scaled rewards allow.
    import yaml

    model = yaml.safe_load((CONFIG.parent / "grpo.yaml").read_text())["model"]
    assert model["class_path"] == "recpost.methods.PPO"
    args = model["init_args"]
    assert {k: args[k] for k in ("k", "kl_coef", "clip_range", "ppo_epochs", "scale_rewards", "baseline",
                                 "kl_estimator", "replacement")} == {
        "k": 8, "kl_coef": 0.0, "clip_range": 0.2, "ppo_epochs": 1, "scale_rewards": "group", "baseline": "group",
        "kl_estimator": "k3", "replacement": True}
    PPO.check_settings(**{**args, "reward_model": "rm.ckpt"})
    PPO.check_settings(**{**args, "reward_model": "rm.ckpt", "kl_coef": 0.04})
