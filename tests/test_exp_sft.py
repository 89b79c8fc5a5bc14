"""Exponential reward-weighted SFT: weights, the SFT limit, stability, starting from a checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from recpost.data import RecDataModule, Table
from recpost.core.errors import RecpostError
from recpost.methods import SFT, ExpSFT
from recpost.methods.losses import effective_sample_size, exp_reward_weights
from recpost.models import BackboneConfig
from tests.helpers import assert_same_loss_and_gradients, write_tiny_interactions

TINY = BackboneConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0)


@pytest.fixture
def datamodule(tmp_path: Path) -> RecDataModule:
    csv = write_tiny_interactions(tmp_path / "tiny.csv")
    return RecDataModule(Table(str(csv), name="tiny"), max_len=8, batch_size=64, cache_dir=str(tmp_path / "cache"))


def _module(cls, dm: RecDataModule, **kw):
    torch.manual_seed(0)
    return cls(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=dm.max_len, backbone=TINY, **kw)


def test_batch_mean_weights_match_hand_computed_values():
    w = exp_reward_weights(torch.tensor([1.0, 2.0]), lam=1.0)
    e = math.e
    assert w.tolist() == pytest.approx([2 / (1 + e), 2 * e / (1 + e)], rel=1e-6)
    assert w.mean().item() == pytest.approx(1.0)


def test_unnormalised_weights_are_exp_of_reward_over_lambda():
    w = exp_reward_weights(torch.tensor([0.0, 1.0, 3.0]), lam=2.0, normalize="none")
    assert w.tolist() == pytest.approx([1.0, math.exp(0.5), math.exp(1.5)], rel=1e-6)


def test_tiny_lambda_gives_finite_weights_on_the_best_rewards():
    w = exp_reward_weights(torch.tensor([1.0, 5.0, 5.0, 3.0]), lam=1e-3)
    assert torch.isfinite(w).all()
    assert w.tolist() == pytest.approx([0.0, 2.0, 2.0, 0.0], abs=1e-6)


def test_unnormalised_weights_that_would_overflow_are_rejected():
    with pytest.raises(RecpostError, match="overflows"):
        exp_reward_weights(torch.tensor([5.0]), lam=1e-3, normalize="none")


def test_max_weight_clips_after_normalising():
    w = exp_reward_weights(torch.tensor([1.0, 5.0]), lam=0.5, max_weight=1.5)
    assert w.max().item() == pytest.approx(1.5)


def test_effective_sample_size_is_one_for_equal_weights_and_one_over_n_for_a_single_one():
    assert effective_sample_size(torch.ones(8)).item() == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([0.0, 0.0, 0.0, 4.0])).item() == pytest.approx(0.25)


def test_lambda_to_infinity_matches_sft(datamodule):
    batch = datamodule.train_batch(list(range(32)))
    assert_same_loss_and_gradients(_module(SFT, datamodule), _module(ExpSFT, datamodule, lam=1e8), batch)


def test_small_lambda_changes_the_gradient(datamodule):
    batch = datamodule.train_batch(list(range(32)))
    sft, exp = _module(SFT, datamodule), _module(ExpSFT, datamodule, lam=0.5)
    sft.training_loss(batch)[0].backward()
    exp.training_loss(batch)[0].backward()
    assert not torch.allclose(sft.backbone.item_emb.weight.grad, exp.backbone.item_emb.weight.grad)


def test_lambda_1e_minus_3_trains_without_overflow(datamodule):
    module = _module(ExpSFT, datamodule, lam=1e-3)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for i in range(5):
        loss, logs = module.training_loss(datamodule.train_batch(list(range(i * 16, i * 16 + 16))))
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_non_positive_lambda_is_rejected(datamodule, lam):
    with pytest.raises(RecpostError, match="lam must be > 0"):
        _module(ExpSFT, datamodule, lam=lam)


def test_nan_rewards_are_rejected(datamodule):
    batch = datamodule.train_batch(list(range(8)))
    batch["next_rewards"][batch["next_items"] > 0] = float("nan")
    with pytest.raises(RecpostError, match="NaN"):
        _module(ExpSFT, datamodule).training_loss(batch)


def _save_checkpoint(module, path: Path) -> Path:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def test_init_from_copies_the_backbone_weights(datamodule, tmp_path):
    source = _module(SFT, datamodule)
    with torch.no_grad():
        source.backbone.item_emb.weight.add_(1.0)
    ckpt = _save_checkpoint(source, tmp_path / "src.ckpt")
    target = _module(ExpSFT, datamodule, init_from=str(ckpt))
    for a, b in zip(source.backbone.state_dict().values(), target.backbone.state_dict().values()):
        assert torch.equal(a, b)
    assert target.hparams.init_from == str(ckpt)


def test_init_from_a_missing_checkpoint_is_one_clear_error(datamodule, tmp_path):
    with pytest.raises(RecpostError, match="checkpoint not found"):
        _module(ExpSFT, datamodule, init_from=str(tmp_path / "nope.ckpt"))


def test_init_from_a_checkpoint_of_another_catalog_is_rejected(datamodule, tmp_path):
    source = _module(SFT, datamodule)
    source.hparams.item_map_hash = "0123456789abcdef"
    ckpt = _save_checkpoint(source, tmp_path / "other.ckpt")
    with pytest.raises(RecpostError, match="another item catalog"):
        _module(ExpSFT, datamodule, init_from=str(ckpt))


def test_init_from_another_architecture_is_rejected(datamodule, tmp_path):
    torch.manual_seed(0)
    wide = SFT(n_items=datamodule.n_items, item_map_hash=datamodule.item_map_hash, max_len=8,
               backbone=BackboneConfig(d_model=32, n_layers=1, n_heads=2))
    ckpt = _save_checkpoint(wide, tmp_path / "wide.ckpt")
    with pytest.raises(RecpostError, match="another backbone architecture"):
        _module(ExpSFT, datamodule, init_from=str(ckpt))


def test_diagnostics_report_weights_ess_and_the_liked_share(datamodule):
    batch = datamodule.train_batch(list(range(32)))
    _, logs = _module(ExpSFT, datamodule, lam=0.5).training_loss(batch)
    assert logs["weight_min"] <= logs["weight_mean"] <= logs["weight_max"]
    assert logs["weight_mean"].item() == pytest.approx(1.0, rel=1e-5)
    assert 0 < logs["ess"] <= 1
    # with lam=0.5, liked targets (4-5 stars) carry far more than their share of the count
    liked = batch["next_liked"][batch["next_items"] > 0].float().mean()
    assert logs["liked_loss_share"] > liked


@pytest.mark.parametrize("cls, target_norm", [(SFT, "batch"), (SFT, "dataset"), (ExpSFT, "batch"), (ExpSFT, "dataset")])
def test_the_fused_training_loss_equals_autograd_through_the_per_target_cross_entropy(datamodule, cls, target_norm):
    # training_loss computes the gradients inside the cross-entropy's forward (the weights are known there);
    # the reference differentiates the per-target cross-entropy and its weighted mean as separate steps.
    batch = datamodule.train_batch(list(range(32)))
    module = _module(cls, datamodule, target_norm=target_norm, **({"lam": 0.5} if cls is ExpSFT else {}))
    module.targets_per_batch = 40.0
    loss, logs = module.training_loss(batch)
    loss.backward()
    fused = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    ce, rewards = module.next_item_cross_entropy(batch)
    weights = exp_reward_weights(rewards, 0.5) if cls is ExpSFT else torch.ones_like(ce)
    want = (weights * ce).sum() / (40.0 if target_norm == "dataset" else ce.numel())
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    if cls is ExpSFT:
        assert logs["ce"].item() == pytest.approx(ce.mean().item(), rel=1e-5)
    for got, ref in zip(fused, (p.grad for p in module.parameters())):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)
