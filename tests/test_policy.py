"""The policy toolbox shared by PPO, DPO and the diagnostics: masking, sampling, KL, frozen copies."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recpost.core.errors import RecpostError
from recpost.methods.policy import (
    entropy,
    exact_kl,
    kl_k1,
    kl_k3,
    masked_log_probs,
    sample_items,
    state_history,
    top_k_reward,
)
from recpost.models import disable_dropout, frozen_copy

# p and q over items 1..3 (column 0 is padding): KL(p || q) = 0.5 ln 2 + 0 + 0.25 ln 0.5 = 0.25 ln 2.
P = torch.tensor([[0.0, 0.5, 0.25, 0.25]])
Q = torch.tensor([[0.0, 0.25, 0.25, 0.5]])


def _log(p: torch.Tensor) -> torch.Tensor:
    return p.log()  # log 0 = -inf: the padding column is outside the support


def _as_mask(history: torch.Tensor, n_columns: int) -> torch.Tensor:
    """Index lists ``[N, K]`` as a dense ``[N, n_columns]`` bool mask (tests only)."""
    return torch.zeros(history.shape[0], n_columns, dtype=torch.bool).scatter_(1, history, True)


def _history(mask: torch.Tensor) -> torch.Tensor:
    """A dense bool mask ``[N, V + 1]`` as index lists (0 = nothing), as ``state_history`` gives them."""
    return torch.where(mask, torch.arange(mask.shape[1]), 0)


def test_state_history_lists_the_items_before_the_window_and_the_window_up_to_each_state():
    items = torch.tensor([[0, 2, 3], [4, 1, 2]])  # [2, 3] windows
    earlier = torch.tensor([[5, 1], [0, 0]])  # row 0 had items 5 and 1 before its window; row 1 nothing
    states = torch.tensor([[False, True, True], [True, False, False]])
    history = state_history(items, states, earlier)  # [3, 2 + 3]
    assert history.tolist() == [[5, 1, 0, 2, 0], [5, 1, 0, 2, 3], [0, 0, 4, 0, 0]]
    assert _as_mask(history, 6)[:, 1:].tolist() == [  # items 1..5 (column 0, padding, is always masked)
        [True, True, False, False, True],  # (0, 1): 2, and the earlier 5 and 1
        [True, True, True, False, True],  # (0, 2): also 3
        [False, False, False, True, False],  # (1, 0): only 4
    ]
    assert state_history(items, states).tolist() == [[0, 2, 0], [0, 2, 3], [4, 0, 0]]  # no earlier items


def test_masked_log_probs_put_zero_probability_on_the_history_and_padding():
    logits = torch.zeros(1, 5)
    p = masked_log_probs(logits, torch.tensor([[2, 0]])).exp()
    assert p[0].tolist() == pytest.approx([0.0, 1 / 3, 0.0, 1 / 3, 1 / 3])
    assert masked_log_probs(logits).exp()[0].tolist() == pytest.approx([0.0, 0.25, 0.25, 0.25, 0.25])


@pytest.mark.parametrize("history", [None, torch.tensor([[2, 3], [1, 4]])], ids=["no history", "full rows"])
def test_masked_log_probs_put_the_padding_column_at_minus_infinity_in_both_call_forms(history):
    # A history whose rows have no 0 entry (every slot a real item) must still mask padding: the scatter
    # of the history alone would leave column 0 a real candidate.
    logits = torch.arange(10.0).reshape(2, 5)  # padding has a finite, even the largest-but-one, logit
    logp = masked_log_probs(logits, history)
    assert torch.isneginf(logp[:, 0]).all()
    assert logp.exp().sum(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_sampling_without_replacement_never_returns_masked_or_repeated_items():
    torch.manual_seed(0)
    mask = torch.rand(500, 11) < 0.4
    mask[:, 1:5] = False  # at least 4 allowed items per row
    logp = masked_log_probs(torch.randn(500, 11) * 3, _history(mask))
    items = sample_items(logp, 4)
    assert not mask.gather(1, items).any() and (items > 0).all()
    assert (items.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct within a row


def test_sampling_with_replacement_never_returns_masked_items():
    torch.manual_seed(0)
    mask = torch.rand(500, 11) < 0.6
    mask[:, 3] = False
    logp = masked_log_probs(torch.randn(500, 11) * 3, _history(mask))
    items = sample_items(logp, 16, replacement=True)
    assert not mask.gather(1, items).any() and (items > 0).all()


def test_gumbel_top_k_first_draw_follows_the_distribution():
    torch.manual_seed(0)
    logp = _log(P).expand(40_000, 4)
    first = sample_items(logp, 2)[:, 0]
    freq = torch.bincount(first, minlength=4).float() / len(first)
    assert freq.tolist() == pytest.approx(P[0].tolist(), abs=0.01)


def test_sampling_more_items_than_a_state_allows_is_an_error():
    with pytest.raises(RecpostError, match="cannot sample 4 items"):
        sample_items(_log(P), 4)


def test_exact_kl_is_zero_between_identical_distributions():
    assert exact_kl(_log(P), _log(P)).item() == 0.0


def test_exact_kl_matches_the_hand_computed_value_on_three_items():
    assert exact_kl(_log(P), _log(Q)).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_exact_kl_has_finite_gradients_with_masked_items():
    logits = torch.randn(2, 6, requires_grad=True)
    mask = torch.tensor([[False, True, False, False, True, False]] * 2)
    kl = exact_kl(masked_log_probs(logits, _history(mask)), masked_log_probs(torch.randn(2, 6), _history(mask))).sum()
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(logits.grad).all()


def test_entropy_matches_the_hand_computed_value():
    assert entropy(_log(P)).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_k1_and_k3_estimators_are_unbiased():
    torch.manual_seed(0)
    a = torch.multinomial(P[0], 200_000, replacement=True)
    logp_a, logq_a = _log(P)[0, a], _log(Q)[0, a]
    exact = 0.25 * math.log(2)
    assert kl_k1(logp_a, logq_a).mean().item() == pytest.approx(exact, abs=5e-3)
    k3 = kl_k3(logp_a, logq_a)
    assert k3.mean().item() == pytest.approx(exact, abs=5e-3)
    assert (k3 >= 0).all()


def test_top_k_reward_is_the_mean_reward_of_the_best_scored_items():
    scores = torch.tensor([[float("-inf"), 3.0, 1.0, 2.0]])
    rewards = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert top_k_reward(rewards, scores, k=2).tolist() == [4.5]


def test_a_frozen_copy_has_no_gradients_stays_in_eval_mode_and_leaves_the_original_alone():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    ref = frozen_copy(net)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    assert all(p.requires_grad for p in net.parameters()) and net.training
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(net[0].weight, ref[0].weight)


def test_disable_dropout_makes_the_train_mode_forward_deterministic():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    disable_dropout(net)
    x = torch.randn(4, 3)
    assert torch.equal(net(x), net(x))
