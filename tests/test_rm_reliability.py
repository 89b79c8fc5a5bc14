"""The reward-model reliability report: errors and rank correlation with r*, by exposure and support."""

from __future__ import annotations

import math

import pytest
import torch

from recpost.data import RecDataModule, Simulator
from recpost.data.simulator import WorldConfig
from recpost.core.errors import RecpostError
from recpost.evaluation.rm_reliability import average_ranks, exposure_deciles, reliability_report, spearman
from tests.helpers import reward_model_checkpoint


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]


def test_spearman_of_hand_made_cases():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)  # any increasing map: perfect rank agreement
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ranks 0..4 against 1, 0, 3, 2, 4: sum d^2 = 4, rho = 1 - 6 * 4 / (5 * 24) = 0.8
    assert spearman(a, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)
    assert math.isnan(spearman(a, torch.ones(5)))  # a constant side: undefined
    assert math.isnan(spearman(a[:1], a[:1]))


def test_exposure_deciles_cut_items_into_equal_groups_least_exposed_first():
    bins = exposure_deciles(torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3, 0.6]), n_bins=3)
    assert bins.tolist() == [3, 1, 2, 1, 2, 3]


def test_report_on_a_hand_made_case():
    # 4 items: 0 and 1 rarely exposed, 2 and 3 often. The RM is exact on the often exposed items and
    # overestimates the rare ones by 1 (the winner's curse), keeping their order.
    item = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    r_star = torch.tensor([1.0, 2.0, 3.0, 4.0, 2.0, 3.0, 4.0, 5.0])
    pred = r_star + (item < 2).float()
    exposure = torch.tensor([0.01, 0.02, 0.3, 0.4])
    in_support = item >= 1  # item 0 never rated in the training log
    report = reliability_report(pred, r_star, item, exposure, in_support, n_bins=2,
                                extra_groups={"first_state": torch.arange(8) < 4})
    assert report["overall/n"] == 8
    assert report["overall/rmse"] == pytest.approx(math.sqrt(4 / 8))
    assert report["overall/bias"] == pytest.approx(0.5)
    assert report["exposure_decile_1/rmse"] == pytest.approx(1.0)
    assert report["exposure_decile_1/bias"] == pytest.approx(1.0)
    assert report["exposure_decile_2/rmse"] == 0.0
    assert report["exposure_decile_2/spearman"] == pytest.approx(1.0)
    assert report["in_support/n"] == 6 and report["out_of_support/n"] == 2
    assert report["out_of_support/rmse"] == pytest.approx(1.0)
    assert report["in_support/rmse"] == pytest.approx(math.sqrt(2 / 6))
    assert report["first_state/n"] == 4 and report["first_state/bias"] == pytest.approx(0.5)
    # overall ranks: pred = 2, 3, 3, 4, 3, 4, 4, 5 against r* = 1, 2, 3, 4, 2, 3, 4, 5
    assert report["overall/spearman"] == pytest.approx(spearman(pred, r_star))
    assert 0 < report["overall/spearman"] < 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(pred=torch.zeros(3)), "must be aligned"),
    (dict(in_support=torch.ones(4)), "in_support must be a bool tensor"),
    (dict(item=torch.tensor([0, 1, 2, 9])), "item ids must index item_exposure"),
    (dict(n_bins=0), "n_bins must be in"),
    (dict(extra_groups={"top": torch.ones(4)}), "group 'top' must be a bool mask"),
])
def test_bad_input_is_one_clear_line(kwargs, message):
    args = dict(pred=torch.zeros(4), r_star=torch.zeros(4), item=torch.tensor([0, 1, 2, 3]),
                item_exposure=torch.ones(4), in_support=torch.ones(4, dtype=torch.bool), n_bins=2)
    with pytest.raises(RecpostError, match=message) as exc:
        reliability_report(**{**args, **kwargs})
    assert "\n" not in str(exc.value)


def test_reward_check_reports_a_reward_model_on_simulator_data(tmp_path):
    from recpost.diagnostics.reward_check import reliability

    dm = RecDataModule(Simulator(WorldConfig(n_users=60, n_items=80, exposure_concentration=1.0), min_seq_len=5,
                                 max_seq_len=9), max_len=8, cache_dir=str(tmp_path / "cache"))
    rm = reward_model_checkpoint(dm, tmp_path / "rm.ckpt", steps=1)
    out = reliability(dm, str(rm), support_min_ratings=3)
    batch_users = len(dm.eval_users("test"))
    history = sum(int(dm.eval_batch([u], "test")["history_items"].gt(0).sum()) for u in dm.eval_users("test"))
    assert out["reliability/overall/n"] == batch_users * dm.n_items - history  # every unconsumed pair, once
    assert sum(out[f"reliability/exposure_decile_{k}/n"] for k in range(1, 11)) == out["reliability/overall/n"]
    assert out["reliability/in_support/n"] + out["reliability/out_of_support/n"] == out["reliability/overall/n"]
    assert out["reliability/rm_top10/n"] == 10 * batch_users and out["reliability/users"] == batch_users
    assert out["reliability/in_support/items"] + out["reliability/out_of_support/items"] == dm.n_items
    assert out["reliability/exposure_decile_1/train_ratings_per_item"] < out["reliability/exposure_decile_10/train_ratings_per_item"]
    assert all(math.isfinite(out[f"reliability/overall/{m}"]) for m in ("rmse", "bias", "spearman"))


def test_expected_exposure_is_pi_betas_expected_training_count(tmp_path):
    from recpost.diagnostics.reward_check import expected_train_exposure

    dm = RecDataModule(Simulator(WorldConfig(n_users=80, n_items=60), min_seq_len=5, max_seq_len=9), max_len=8,
                       cache_dir=str(tmp_path / "cache"))
    exposure = expected_train_exposure(dm)
    counts = torch.from_numpy(dm.train_item_counts()[1:]).double()
    # every item reaches the catalog here, so each state's probabilities sum to 1: the same total as the log's
    assert dm.n_items == 60 and float(exposure.sum()) == pytest.approx(float(counts.sum()), rel=1e-6)
    assert spearman(exposure, counts) > 0.7  # the log's counts are one draw of these expectations
    sampled = expected_train_exposure(dm, max_states=200)  # a sample of the states, scaled back
    assert float(sampled.sum()) == pytest.approx(float(counts.sum()), rel=1e-6)
