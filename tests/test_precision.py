"""bf16-mixed on CPU: every method's loss, exp-weights, log-probabilities over the catalog and KL stay
fp32 (CPU autocast would leave exp / log_softmax in bf16); real fits run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from recpost.data import RecDataModule, Table
from recpost.methods import ASFT, DPO, PPO, SFT, ExpSFT, LinearSFT, RewardModel
from recpost.methods.losses import exp_weighted_cross_entropy
from recpost.methods.policy import exact_kl, state_log_probs, state_positions
from recpost.models import BackboneConfig
from tests.helpers import write_tiny_interactions
from tests.helpers import build, init_reward_biases, last_metrics, pretrained_checkpoint, reward_model_checkpoint, tiny_datamodule
from tests.helpers import latest_run, recpost

METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"
F32 = torch.float32


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _fp32_and_finite(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == F32 and bool(torch.isfinite(t).all()) for t in tensors)


def test_autocast_is_on_in_these_tests():
    """The premise: CPU autocast really computes the backbone's matmuls in bf16."""
    with _bf16():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_scores_and_exp_sft_loss_are_fp32_under_cpu_autocast(tmp_path):
    dm = RecDataModule(Table(str(write_tiny_interactions(tmp_path / "t.csv")), name="t"), max_len=8,
                       cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(0)
    m = ExpSFT(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=8, lam=1e-3,
               backbone=BackboneConfig(d_model=16, n_layers=1, n_heads=2))
    with _bf16():
        loss, logs = m.training_loss(dm.train_batch(list(range(16))))
        scores = m.catalog_scores(dm.eval_batch(list(range(4)), "val"))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert scores.dtype == torch.float32
    # fp32 scores keep distinct values (bf16 would collapse many of them)
    finite = scores[torch.isfinite(scores)]
    assert finite.unique().numel() == finite.numel()


@pytest.fixture
def tiny(rlhf_setup):
    """(datamodule, pretrained checkpoint, reward-model checkpoint, a training batch)."""
    dm, pre, rm = rlhf_setup
    return dm, pre, rm, dm.train_batch(list(range(32)))


def test_sft_loss_is_fp32_under_cpu_autocast(tiny):
    dm, _, _, batch = tiny
    with _bf16():
        loss, _ = build(SFT, dm).training_loss(batch)
    assert _fp32_and_finite(loss)


def test_exp_sft_weights_and_cross_entropy_are_fp32_under_cpu_autocast(tiny):
    dm, _, _, batch = tiny
    with _bf16():
        loss, logs = build(ExpSFT, dm, lam=0.1).training_loss(batch)
        # bf16 inputs, as a bf16 output layer would give them: the pieces are still computed in fp32
        logits, rewards = torch.randn(64, 41).bfloat16(), (torch.rand(64) * 4 + 1).bfloat16()
        pure_loss, weights, ce = exp_weighted_cross_entropy(logits, torch.randint(1, 41, (64,)), rewards, lam=0.1)
    assert _fp32_and_finite(loss, *logs.values())
    assert _fp32_and_finite(pure_loss, weights, ce)
    # exp(r / 0.1) over a 4-star range spans e^40: only fp32 (in log space) keeps the batch mean at 1
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)


def test_reward_model_loss_and_predictions_are_fp32_under_cpu_autocast(tiny):
    dm, _, _, batch = tiny
    rm = init_reward_biases(build(RewardModel, dm), dm)
    with _bf16():
        loss, logs = rm.training_loss(batch)
        catalog = rm.predict_rewards(batch["input_items"], batch["input_ratings"])
        at_states = rm.rating_model.rewards_at(batch["input_items"], batch["input_ratings"], batch["next_items"] > 0)
    assert _fp32_and_finite(loss, logs["rmse"], catalog[:, 1:], at_states[:, 1:])


@pytest.mark.parametrize("baseline", ["group", "value"])
def test_ppo_rollout_kl_and_loss_are_fp32_under_cpu_autocast(tiny, baseline):
    dm, pre, rm, batch = tiny
    ppo = build(PPO, dm, init_from=str(pre), reward_model=str(rm), k=4, baseline=baseline)
    with _bf16():
        roll = ppo.rollout(batch)
        rows = ppo._minibatches(len(roll.states), shuffle=False, device=roll.states.device)[0]
        loss, stats, ratio = ppo.minibatch_loss(batch, roll, rows)
    assert _fp32_and_finite(roll.logp_old, roll.advantages, roll.returns, *roll.stats.values())
    assert roll.ref_logp.dtype == F32  # reference log-probs over the catalog (-inf on the masked items)
    if roll.values is not None:  # V starts at the mean reward, which bf16 would round by up to 1/128 star
        assert _fp32_and_finite(roll.values)
        assert torch.allclose(roll.values, roll.returns.mean().expand_as(roll.values), rtol=0, atol=1e-6)
    assert _fp32_and_finite(loss, ratio, *stats.values())
    # the policy starts at the reference: in fp32 the rollout's ratio is exactly 1
    assert torch.equal(ratio, torch.ones_like(ratio))


def test_policy_log_probs_and_exact_kl_are_fp32_under_cpu_autocast(tiny):
    dm, pre, _, batch = tiny
    policy = build(SFT, dm, init_from=str(pre))
    states = state_positions(batch, "all")
    with _bf16():
        logp, _ = state_log_probs(policy.backbone, batch["input_items"], batch["input_ratings"], states)
        kl = exact_kl(logp, logp.roll(1, dims=0))
    assert logp.dtype == F32 and kl.dtype == F32
    probs = logp.exp().sum(dim=-1)
    assert torch.allclose(probs, torch.ones_like(probs), atol=1e-5)  # normalised to fp32 round-off


def test_dpo_loss_and_log_probs_are_fp32_under_cpu_autocast(tiny):
    dm, pre, rm, batch = tiny
    dpo = build(DPO, dm, init_from=str(pre), reward_model=str(rm))
    with _bf16():
        loss, logs = dpo.training_loss(batch)
    assert _fp32_and_finite(loss, *logs.values())
    assert logs["pairs/kept"].item() > 0
    # the policy starts at the reference: margins exactly 0 and the sigmoid loss exactly log 2
    assert logs["rewards/margins"].item() == 0.0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_every_method_on_hstu_keeps_losses_and_scores_fp32_under_cpu_autocast(tmp_path):
    dm = tiny_datamodule(tmp_path)
    hstu = BackboneConfig(name="hstu", d_model=16, n_layers=1, n_heads=2, dropout=0.1)
    pre = pretrained_checkpoint(dm, tmp_path / "pre.ckpt", backbone=hstu)
    rm = reward_model_checkpoint(dm, tmp_path / "rm.ckpt", backbone=hstu)
    post = {"backbone": hstu, "init_from": str(pre)}
    batch, eval_batch = dm.train_batch(list(range(32))), dm.eval_batch(list(range(8)), "val")
    modules = [build(SFT, dm, **post), build(ExpSFT, dm, lam=0.5, **post), build(LinearSFT, dm, **post),
               build(ASFT, dm, reward_model=str(rm), lam=0.5, **post), build(RewardModel, dm, **post),
               build(DPO, dm, reward_model=str(rm), **post)]
    with _bf16():
        for module in modules:
            loss, logs = module.training_loss(batch)
            assert _fp32_and_finite(loss, *logs.values()), type(module).__name__
            scores = module.catalog_scores(eval_batch)
            assert scores.dtype == F32 and torch.isfinite(scores[:, 1:]).any(1).all()
        ppo = build(PPO, dm, reward_model=str(rm), k=4, **post)
        roll = ppo.rollout(batch)
        loss, _, _ = ppo.minibatch_loss(batch, roll, torch.arange(32))
    assert _fp32_and_finite(loss, roll.advantages, roll.logp_old)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
def test_bf16_mixed_fit_runs_and_logs_finite_metrics(tiny_config, backbone):
    out = recpost("fit", "--config", str(tiny_config), "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1",
                  "--model.init_args.backbone.name", backbone)
    assert out.returncode == 0, out.stderr[-3000:]
    header, *rows = (latest_run(tiny_config.parent / "runs").metrics_csv).read_text().splitlines()
    col = header.split(",").index("val/ndcg@10")
    values = [float(r.split(",")[col]) for r in rows if r.split(",")[col]]
    assert values and all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppo", "dpo", "online_dpo"])
def test_bf16_mixed_fit_of_ppo_and_dpo_logs_finite_losses(tiny_config, method):
    dm = tiny_datamodule(tiny_config.parent)  # the same CSV as the config: the same catalog
    pre = pretrained_checkpoint(dm, tiny_config.parent / "pre.ckpt")
    rm = reward_model_checkpoint(dm, tiny_config.parent / "rm.ckpt")
    root = tiny_config.parent / "bf16"
    out = recpost("fit", "--config", str(tiny_config), "--config", str(METHOD_CONFIGS / f"{method}.yaml"),
                  "--model.init_args.init_from", str(pre),
                  "--model.init_args.reward_model", str(rm), "--trainer.precision", "bf16-mixed",
                  "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root))
    assert out.returncode == 0, out.stderr[-3000:]
    _, rows = last_metrics(root)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    val = next(r for r in rows if r.get("val/rm_reward@10"))
    assert math.isfinite(float(val["val/rm_reward@10"]))
