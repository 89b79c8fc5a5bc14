"""The theory's bounds against hand-computed values, and off-policy estimators against exact expectations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from recpost.data.simulator import BanditWorld
from recpost.core.errors import RecpostError
from recpost.evaluation.bounds import additive_lower_bound, eps, lambda_for_loss, tilted_lower_bound, vacuous
from recpost.evaluation.off_policy import (
    direct_method, doubly_robust, ips, kendall_tau, policy_expectation, ranking_agreement, snips,
)


# ----------------------------------------------------------------------------------- bounds
def test_eps_by_hand():
    # |A| = 1, delta = 2 / e^2: log(2 |A| / delta) = 2, so eps = sigma * sqrt(4) = 2 sigma.
    assert eps(0.5, 1, 2 / math.e**2) == pytest.approx(1.0)
    # |A| = 50, delta = 0.1: 2 log(1000) = 13.8155..., sqrt = 3.71692...
    assert eps(1.0, 50, 0.1) == pytest.approx(3.716922, rel=1e-6)
    assert eps(0.0, 10**6) == 0.0


def test_eps_grows_only_with_the_log_of_the_catalog():
    # doubling |A| adds the same to eps^2 / (2 sigma^2) whatever |A| is: log 2
    for n in (10, 1000, 10**6):
        assert (eps(1.0, 2 * n) ** 2 - eps(1.0, n) ** 2) / 2 == pytest.approx(math.log(2))


def test_theorem_bounds_by_hand():
    assert additive_lower_bound(3.2, 0.25) == pytest.approx(2.7)
    # 2 eps / lambda = 1: V - R_max (e - 1) = 3.2 - 4 * 1.718281828 = -3.673127
    assert tilted_lower_bound(3.2, 0.25, 0.5, 4.0) == pytest.approx(3.2 - 4 * (math.e - 1))
    assert tilted_lower_bound(3.2, 0.0, 0.5, 4.0) == 3.2  # exact rewards: never worse than pi_beta
    assert tilted_lower_bound(3.2, 10.0, 1e-3, 4.0) == -math.inf  # exp overflows: no guarantee
    # large lambda: R_max (exp(2 eps / lambda) - 1) ~ 2 R_max eps / lambda (relative gap eps / lambda)
    assert 3.2 - tilted_lower_bound(3.2, 0.1, 100.0, 4.0) == pytest.approx(2 * 4 * 0.1 / 100, rel=2e-3)


def test_lambda_for_a_tolerated_loss_gives_exactly_that_loss():
    # tau = R_max (e - 1): log(1 + tau / R_max) = 1, so lambda = 2 eps
    assert lambda_for_loss(0.25, 4 * (math.e - 1), 4.0) == pytest.approx(0.5)
    lam = lambda_for_loss(0.3, 0.2, 4.0)
    assert tilted_lower_bound(3.0, 0.3, lam, 4.0) == pytest.approx(3.0 - 0.2)
    assert lambda_for_loss(0.0, 0.2, 4.0) == 0.0


def test_a_bound_below_the_worst_value_is_vacuous():
    assert vacuous(0.5, worst_value=1.0) and vacuous(1.0, worst_value=1.0) and not vacuous(1.5, worst_value=1.0)


@pytest.mark.parametrize("call, message", [
    (lambda: eps(-1.0, 10), "sigma must be >= 0"),
    (lambda: eps(1.0, 0), "n_actions must be a positive integer"),
    (lambda: eps(1.0, 10, 1.5), "delta must be in"),
    (lambda: tilted_lower_bound(3.0, 0.1, 0.0, 4.0), "lambda must be > 0"),
    (lambda: tilted_lower_bound(3.0, 0.1, 1.0, 0.0), "R_max must be > 0"),
    (lambda: lambda_for_loss(0.1, 0.0, 4.0), "tolerated loss must be > 0"),
])
def test_bad_bound_arguments_are_one_clear_line(call, message):
    with pytest.raises(RecpostError, match=message) as exc:
        call()
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------- off-policy estimators
# A world small enough to enumerate: 2 equally likely contexts, 3 actions, rewards in {0, 1, 5}.
P_CONTEXT = torch.tensor([0.5, 0.5], dtype=torch.float64)
BEHAVIOR = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
TARGET = torch.tensor([[0.1, 0.2, 0.7], [0.0, 0.5, 0.5]], dtype=torch.float64)
REWARDS = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64)
P_REWARD = torch.tensor([  # [x, a, r]
    [[0.5, 0.5, 0.0], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]],
    [[0.9, 0.1, 0.0], [0.3, 0.3, 0.4], [0.0, 0.5, 0.5]],
], dtype=torch.float64)
Q_HAT = torch.tensor([[0.3, 2.0, 2.5], [1.0, 1.0, 4.0]], dtype=torch.float64)  # a deliberately wrong direct model
TRUE_VALUE = float((P_CONTEXT[:, None] * TARGET * (P_REWARD * REWARDS).sum(-1)).sum())
OUTCOMES = [(x, a, r, float(P_CONTEXT[x] * BEHAVIOR[x, a] * P_REWARD[x, a, r]))
            for x, a, r in itertools.product(range(2), range(3), range(3)) if P_REWARD[x, a, r] > 0]


def _estimates(samples) -> dict[str, float]:
    x = torch.tensor([s[0] for s in samples])
    a = torch.tensor([s[1] for s in samples])
    r = REWARDS[torch.tensor([s[2] for s in samples])]
    target, behavior = TARGET[x, a], BEHAVIOR[x, a]
    q_target = policy_expectation(TARGET[x], Q_HAT[x])
    return {
        "ips": ips(r, target, behavior).value,
        "snips": snips(r, target, behavior).value,
        "dr": doubly_robust(r, target, behavior, Q_HAT[x, a], q_target).value,
        "dm": direct_method(q_target).value,
    }


@pytest.mark.parametrize("n", [1, 2])
def test_ips_and_doubly_robust_are_exactly_unbiased_by_enumeration(n):
    expected = dict.fromkeys(("ips", "dr", "dm"), 0.0)
    for draws in itertools.product(OUTCOMES, repeat=n):  # every log of n samples, with its probability
        prob = math.prod(d[3] for d in draws)
        est = _estimates([d[:3] for d in draws])
        for name in expected:
            expected[name] += prob * est[name]
    assert expected["ips"] == pytest.approx(TRUE_VALUE, abs=1e-12)
    assert expected["dr"] == pytest.approx(TRUE_VALUE, abs=1e-12)  # whatever the direct model
    assert abs(expected["dm"] - TRUE_VALUE) > 0.1  # the direct model alone is as biased as it is wrong


def test_snips_is_biased_for_two_samples_and_consistent():
    expected = 0.0
    for draws in itertools.product(OUTCOMES, repeat=2):
        est = _estimates([d[:3] for d in draws])["snips"]
        expected += math.prod(d[3] for d in draws) * (0.0 if math.isnan(est) else est)
    assert abs(expected - TRUE_VALUE) > 1e-3  # finite-sample bias (the NaN logs, all weights 0, count as 0)
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    x = torch.multinomial(P_CONTEXT, n, replacement=True, generator=gen)
    a = torch.multinomial(BEHAVIOR[x], 1, generator=gen).squeeze(1)
    r = REWARDS[torch.multinomial(P_REWARD[x, a], 1, generator=gen).squeeze(1)]
    est = snips(r, TARGET[x, a], BEHAVIOR[x, a])
    assert abs(est.value - TRUE_VALUE) < 4 * est.stderr  # 4 standard errors: fails ~1 time in 16,000
    assert 0 < est.ess < n


def test_estimators_recover_a_policy_value_in_the_bandit_world():
    # Ratings are r* plus clipped noise, so what they estimate is E[rating | r*] (expected_rating), not r*.
    world = BanditWorld(n_contexts=8, n_actions=15, history_len=2, noise_std=0.5, round_to_stars=False)
    context, action, reward = world.sample_logs(3000, torch.Generator().manual_seed(0))
    target = world.target(1.0)  # [C, A]
    items = torch.arange(world.n_actions).expand_as(target)
    truth = float((target.double() * world.world.expected_rating(world.true_reward, items).double()).sum(-1).mean())
    t, b = target[context, action], world.pi_beta[context, action]
    est_ips = ips(reward, t, b)
    q = world.true_reward  # a good direct model
    est_dr = doubly_robust(reward, t, b, q[context, action], policy_expectation(target[context], q[context]))
    for est in (est_ips, est_dr, snips(reward, t, b)):
        assert abs(est.value - truth) < 4 * est.stderr
    assert est_dr.stderr < 0.5 * est_ips.stderr  # the direct model removes most of the variance


def test_kendall_tau_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(a, a.exp()) == 1.0 and kendall_tau(a, -a) == -1.0
    # one swapped pair of 6: (5 - 1) / 6
    assert kendall_tau(a, torch.tensor([2.0, 1.0, 3.0, 4.0])) == pytest.approx(4 / 6)
    # tau-b with a tie in b: 5 concordant, 0 discordant, sqrt(6 * 5)
    assert kendall_tau(a, torch.tensor([1.0, 1.0, 3.0, 4.0])) == pytest.approx(5 / math.sqrt(30))
    assert math.isnan(kendall_tau(a, torch.ones(4))) and math.isnan(kendall_tau(a[:1], a[:1]))


def test_kendall_tau_is_scipys():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 4, (12,), generator=gen).double(), torch.randint(0, 5, (12,), generator=gen).double()
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a.numpy(), b.numpy()).statistic, abs=1e-12)


def test_ranking_agreement_of_an_estimator_that_swaps_the_two_best_policies():
    true = torch.tensor([3.0, 3.5, 4.0])
    out = ranking_agreement(torch.tensor([3.1, 4.2, 4.1]), true)
    assert out == {"kendall_tau": pytest.approx(1 / 3), "pairs_in_order": pytest.approx(2 / 3), "best_found": 0.0}
    assert ranking_agreement(true + 1, true) == {"kendall_tau": 1.0, "pairs_in_order": 1.0, "best_found": 1.0}
    nan_estimate = ranking_agreement(torch.tensor([math.nan, 1.0, 2.0]), true)  # e.g. SNIPS with all weights 0
    assert nan_estimate["pairs_in_order"] == pytest.approx(1 / 3) and nan_estimate["best_found"] == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: ips(torch.ones(3), torch.ones(2), torch.ones(3)), "must be aligned"),
    (lambda: ips(torch.ones(2), torch.ones(2), torch.tensor([0.5, 0.0])), "behavior_prob must be in \\(0, 1\\]"),
    (lambda: ips(torch.ones(2), torch.tensor([0.5, 1.5]), torch.ones(2)), "target_prob must be probabilities"),
    (lambda: ips(torch.tensor([1.0, math.nan]), torch.ones(2), torch.ones(2)), "reward has NaN"),
    (lambda: ips(torch.ones(0), torch.ones(0), torch.ones(0)), "no logged samples"),
    (lambda: policy_expectation(torch.ones(2, 3), torch.ones(2, 4)), "must both be \\[N, A\\]"),
    (lambda: kendall_tau(torch.ones(2), torch.ones(3)), "kendall_tau: a and b must be aligned"),
    (lambda: ranking_agreement(torch.ones(2), torch.ones(3)), "ranking_agreement: estimated and true must be aligned"),
])
def test_bad_off_policy_input_is_one_clear_line(call, message):
    with pytest.raises(RecpostError, match=message) as exc:
        call()
    assert "\n" not in str(exc.value)
