"""Ranking metrics against hand-computed values."""

import math

import pytest
import torch

from recpost.evaluation import RankingMetrics, mask_items, target_ranks


def _scores(rows: list[list[float]]) -> torch.Tensor:
    """Scores with a padding column 0 at -inf in front."""
    s = torch.tensor(rows, dtype=torch.float32)
    return torch.cat([torch.full((s.shape[0], 1), float("-inf")), s], dim=1)


def test_target_rank_counts_ties_against_the_target():
    scores = _scores([[0.5, 0.5, 0.5, 0.1]])
    assert target_ranks(scores, torch.tensor([2])).item() == 2  # two others tie with it
    assert target_ranks(scores, torch.tensor([4])).item() == 3


def test_constant_scores_rank_every_target_last():
    scores = _scores([[1.0] * 20])
    assert target_ranks(scores, torch.tensor([7])).item() == 19


def test_mask_items_sets_history_and_padding_to_minus_inf():
    scores = torch.zeros(2, 6)
    mask_items(scores, torch.tensor([[0, 3, 5], [0, 0, 1]]))
    assert torch.isinf(scores[0, [0, 3, 5]]).all() and torch.isfinite(scores[0, [1, 2, 4]]).all()
    assert torch.isinf(scores[1, [0, 1]]).all() and torch.isfinite(scores[1, 2:]).all()


def test_metrics_match_hand_computed_values():
    # 12 items. User 0: target ranked 1st (rank 0). User 1: target ranked 3rd (rank 2).
    # User 2: target ranked 12th (rank 11): outside top-10, inside top-50.
    n_items = 12
    base = [float(n_items - i) for i in range(n_items)]  # item j (1-based) has rank j - 1
    scores = _scores([base, base, base])
    target = torch.tensor([1, 3, 12])
    rating = torch.tensor([5.0, 2.0, 4.0])
    liked = rating >= 4
    m = RankingMetrics(n_items)
    m.update(scores, target, rating, liked, torch.tensor([0, 1, 2]))
    out = m.compute()
    ndcg = [1.0, 1 / math.log2(4), 0.0]
    assert out["ndcg@10"] == pytest.approx(sum(ndcg) / 3)
    assert out["hr@10"] == pytest.approx(2 / 3)
    assert out["hr@50"] == pytest.approx(1.0)
    assert out["ndcg@50"] == pytest.approx((1.0 + 1 / math.log2(4) + 1 / math.log2(13)) / 3)
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 3)
    # liked targets: users 0 and 2
    assert out["ndcg@10_liked"] == pytest.approx(0.5)
    assert out["hr@10_liked"] == pytest.approx(0.5)
    # mean logged rating of the hit targets (users 0 and 1)
    assert out["rating@10"] == pytest.approx(3.5)
    # everybody's top-10 are items 1..10
    assert out["coverage@10"] == pytest.approx(10 / 12)
    assert out["n_users"] == 3


def test_repeated_users_are_counted_once():
    """Lightning's distributed sampler pads shards with repeated samples; they must not count."""
    base = _scores([[3.0, 2.0, 1.0, 0.0]])
    once, twice = RankingMetrics(4), RankingMetrics(4)
    args = (torch.tensor([5.0, 1.0]), torch.tensor([True, False]), torch.tensor([0, 1]))
    once.update(base.repeat(2, 1), torch.tensor([1, 4]), *args)
    twice.update(base.repeat(2, 1), torch.tensor([1, 4]), *args)
    twice.update(base[:1], torch.tensor([1]), torch.tensor([5.0]), torch.tensor([True]), torch.tensor([0]))
    assert once.compute() == twice.compute()


def test_liked_metrics_are_nan_without_liked_targets():
    m = RankingMetrics(3)
    m.update(_scores([[1.0, 2.0, 3.0]]), torch.tensor([3]), torch.tensor([1.0]), torch.tensor([False]), torch.tensor([0]))
    out = m.compute()
    assert math.isnan(out["ndcg@10_liked"]) and out["ndcg@10"] == 1.0


def test_extra_per_user_values_are_averaged_over_distinct_users():
    m = RankingMetrics(3, extra=("true_reward@10",))
    s = _scores([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    m.update(s, torch.tensor([3, 1]), torch.ones(2), torch.ones(2, dtype=torch.bool), torch.tensor([0, 1]),
             {"true_reward@10": torch.tensor([4.0, 2.0])})
    m.update(s[:1], torch.tensor([3]), torch.ones(1), torch.ones(1, dtype=torch.bool), torch.tensor([0]),
             {"true_reward@10": torch.tensor([4.0])})
    assert m.compute()["true_reward@10"] == pytest.approx(3.0)
