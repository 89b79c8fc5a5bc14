"""Filtered BC: SFT on the targets rated at least ``min_rating``; ExpSFT's lambda -> 0 limit; its edge cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from recpost.core.errors import RecpostError
from recpost.methods import SFT, ExpSFT, FilteredBC
from recpost.models import BackboneConfig
from tests.helpers import assert_same_loss_and_gradients, build, tiny_datamodule

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"
NO_DROPOUT = BackboneConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0)


@pytest.fixture
def datamodule(tmp_path):
    return tiny_datamodule(tmp_path)


@pytest.fixture
def batch(datamodule):
    return datamodule.train_batch(list(range(32)))


def _ratings(batch) -> torch.Tensor:
    return batch["next_ratings"][batch["next_items"] > 0]  # [N], in the order of the targets


@pytest.mark.parametrize(("norm", "threshold"), [("batch_mean", 4.0), ("none", 4.0), ("fixed", 5.0)])
def test_the_loss_is_the_cross_entropy_of_the_kept_targets(datamodule, batch, norm, threshold):
    module = build(FilteredBC, datamodule, min_rating=threshold, weight_norm=norm, backbone=NO_DROPOUT)
    loss, logs = module.training_loss(batch)
    ce, _ = module.next_item_cross_entropy(batch)  # [N]
    kept = _ratings(batch) >= threshold
    assert 0 < kept.sum() < len(kept)
    # batch_mean: the mean over the kept targets (SFT on the filtered data); none / fixed: their sum over all N
    expected = ce[kept].mean() if norm == "batch_mean" else ce[kept].sum() / len(ce)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["kept"].item() == kept.sum().item()
    assert logs["kept_share"].item() == pytest.approx(kept.float().mean().item())


def test_null_min_rating_keeps_the_liked_targets(datamodule, batch):
    liked = build(FilteredBC, datamodule, backbone=NO_DROPOUT)  # data.liked_threshold: 4 by default
    assert torch.equal(liked.kept(batch), batch["next_liked"][batch["next_items"] > 0])
    assert_same_loss_and_gradients(liked, build(FilteredBC, datamodule, min_rating=4.0, backbone=NO_DROPOUT), batch)


def test_exp_sft_tends_to_filtered_bc_at_the_batchs_highest_rating_as_lambda_goes_to_zero(datamodule, batch):
    # With batch_mean, exp((r - max r) / lam) over its mean -> N / n_max on the best-rated targets, 0 elsewhere:
    # filtered BC with min_rating = the batch's highest rating (1-star gaps: exp(-1 / 1e-3) is 0 in fp32).
    top = _ratings(batch).max().item()
    assert (_ratings(batch) < top).any()
    assert_same_loss_and_gradients(build(ExpSFT, datamodule, lam=1e-3, backbone=NO_DROPOUT),
                                   build(FilteredBC, datamodule, min_rating=top, backbone=NO_DROPOUT), batch)
    # ... and not at a moderate lambda, so the comparison can fail
    exp_sft = build(ExpSFT, datamodule, lam=1.0, backbone=NO_DROPOUT)
    filtered = build(FilteredBC, datamodule, min_rating=top, backbone=NO_DROPOUT)
    assert abs(exp_sft.training_loss(batch)[0].item() - filtered.training_loss(batch)[0].item()) > 1e-3


@pytest.mark.parametrize("norm", ["batch_mean", "fixed"])
def test_a_threshold_below_every_rating_is_plain_sft(datamodule, batch, norm):
    assert_same_loss_and_gradients(build(SFT, datamodule, backbone=NO_DROPOUT),
                                   build(FilteredBC, datamodule, min_rating=0.0, weight_norm=norm, backbone=NO_DROPOUT),
                                   batch)


def test_a_batch_with_no_kept_target_has_zero_loss_zero_gradient_and_logs_the_count(datamodule, batch):
    batch["next_ratings"] = torch.where(batch["next_items"] > 0, 2.0, 0.0)  # every target rated 2 stars
    module = build(FilteredBC, datamodule, min_rating=4.0, backbone=NO_DROPOUT)
    loss, logs = module.training_loss(batch)
    loss.backward()
    assert loss.item() == 0.0 and logs["kept"].item() == 0.0 and torch.isfinite(logs["ess"])
    assert all(p.grad is None or not p.grad.any() for p in module.parameters())


def test_a_threshold_above_the_rating_scale_is_refused_before_training(datamodule):
    module = build(FilteredBC, datamodule, min_rating=6.0)
    with pytest.raises(RecpostError, match=r"model.min_rating 6 is above the data's highest rating 5: no target would "
                                           r"be kept; use a threshold in \[1, 5\]"):
        module.check_threshold(datamodule)
    build(FilteredBC, datamodule, min_rating=5.0).check_threshold(datamodule)  # the top of the scale is fine


def test_a_non_finite_min_rating_is_one_clear_error(datamodule):
    with pytest.raises(RecpostError, match="model.min_rating must be a finite number"):
        build(FilteredBC, datamodule, min_rating=float("nan"))


def test_the_config_keeps_the_liked_targets_with_exp_sfts_normalisation():
    model = yaml.safe_load((CONFIGS / "filtered_bc.yaml").read_text())["model"]
    assert model["class_path"] == "recpost.methods.FilteredBC"
    args = model["init_args"]
    assert args["min_rating"] is None and args["weight_norm"] == "batch_mean"
    FilteredBC.check_settings(**args)
