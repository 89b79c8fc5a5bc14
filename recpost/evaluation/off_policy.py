"""Off-policy estimates of a target policy's value from logged data with known propensities.

Logged samples ``n = 1..N``: a context ``x_n`` (a user's history), the action ``a_n`` that the
behaviour policy ``pi_beta`` took, its propensity ``pi_beta(a_n | x_n)`` and the observed reward
``r_n``. For a target policy ``pi`` with importance weight ``w_n = pi(a_n | x_n) / pi_beta(a_n | x_n)``:

- :func:`ips` (inverse propensity scoring): ``mean(w r)``; unbiased whenever ``pi_beta > 0`` wherever
  ``pi > 0``, with a variance that grows with the weights;
- :func:`snips` (self-normalised IPS): ``sum(w r) / sum(w)``; biased for finite ``N`` (consistent), but
  invariant to a shift of the rewards and far less variable when weights are large;
- :func:`doubly_robust`: ``mean(q_pi(x) + w (r - q(x, a)))`` with a direct model ``q`` (e.g. a learned
  reward model) and ``q_pi(x) = sum_a pi(a | x) q(x, a)``; unbiased like IPS for any ``q``, and of
  low variance when ``q`` is good;
- :func:`direct_method`: ``mean(q_pi(x))``, the reward model's own opinion (biased as the model is).

Each returns an :class:`Estimate`: the value, its standard error (the sample std of the per-sample
terms over ``sqrt(N)``; the delta method for SNIPS) and the Kish effective sample size of the
weights, ``(sum w)^2 / sum w^2``, which says how many logs the estimate really rests on.

Whether an estimator would have picked the right policies is :func:`ranking_agreement` of its
estimates against the true values: Kendall's tau-b (:func:`kendall_tau`, a few lines here rather than
scipy, which recpost does not depend on), the share of pairs put in the true order, and whether the
best policy is the truly best one.

Why not Open Bandit Pipeline: its estimators (``obp.ope``) are these same few lines over flat
``[N, A, positions]`` action distributions; its current release (0.5.7) does not install on Python
3.11, and the older 0.4.1 pulls scikit-learn, pandas and seaborn in. Here the action set is a whole
catalog per state and the propensities come from the simulator per history, so the estimators take
the per-sample quantities (``pi(a_n|x_n)``, ``pi_beta(a_n|x_n)``, ``q_pi(x_n)``) that the caller
computes by chunks, which also keeps them pure functions of tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from recpost.core.errors import RecpostError


class Estimate(NamedTuple):
    """An off-policy estimate: ``value``, its standard error ``stderr`` and the weights' ``ess``."""

    value: float
    stderr: float
    ess: float


def _as_columns(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp64 ``[N]`` copies, checked: aligned, non-empty, finite."""
    out = {name: torch.as_tensor(t).double().flatten() for name, t in tensors.items()}
    lengths = {name: len(t) for name, t in out.items()}
    if len(set(lengths.values())) != 1:
        raise RecpostError(f"off-policy estimate: inputs must be aligned [N] tensors, got lengths {lengths}")
    if not next(iter(lengths.values())):
        raise RecpostError("off-policy estimate: no logged samples; give at least one")
    for name, t in out.items():
        if not bool(torch.isfinite(t).all()):
            raise RecpostError(f"off-policy estimate: {name} has NaN or infinite values")
    return out


def importance_weights(target_prob: torch.Tensor, behavior_prob: torch.Tensor) -> torch.Tensor:
    """``pi(a_n | x_n) / pi_beta(a_n | x_n)`` ``[N]``; refuses a logged action that ``pi_beta`` could not take."""
    cols = _as_columns(target_prob=target_prob, behavior_prob=behavior_prob)
    t, b = cols["target_prob"], cols["behavior_prob"]
    if bool((t < 0).any()) or bool((t > 1 + 1e-9).any()):
        raise RecpostError("off-policy estimate: target_prob must be probabilities in [0, 1]")
    if bool((b <= 0).any()) or bool((b > 1 + 1e-9).any()):
        raise RecpostError(
            "off-policy estimate: behavior_prob must be in (0, 1]: a logged action with propensity 0 cannot come "
            "from that pi_beta; pass the logging policy's probability of each logged action"
        )
    return t / b


def _ess(w: torch.Tensor) -> float:
    square = float(w.pow(2).sum())
    return float(w.sum()) ** 2 / square if square > 0 else 0.0


def _mean_estimate(terms: torch.Tensor, w: torch.Tensor) -> Estimate:
    n = len(terms)
    stderr = float(terms.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    return Estimate(float(terms.mean()), stderr, _ess(w))


def ips(reward: torch.Tensor, target_prob: torch.Tensor, behavior_prob: torch.Tensor) -> Estimate:
    """Inverse propensity scoring ``mean(w r)`` over logged ``reward [N]`` with the logged action's
    ``target_prob [N]`` under ``pi`` and ``behavior_prob [N]`` under ``pi_beta``."""
    w = importance_weights(target_prob, behavior_prob)
    r = _as_columns(reward=reward, weight=w)["reward"]
    return _mean_estimate(w * r, w)


def snips(reward: torch.Tensor, target_prob: torch.Tensor, behavior_prob: torch.Tensor) -> Estimate:
    """Self-normalised IPS ``sum(w r) / sum(w)`` (arguments as :func:`ips`); NaN if every weight is 0."""
    w = importance_weights(target_prob, behavior_prob)
    r = _as_columns(reward=reward, weight=w)["reward"]
    total = float(w.sum())
    if total <= 0:
        return Estimate(math.nan, math.nan, 0.0)
    value = float((w * r).sum()) / total
    stderr = float((w * (r - value)).pow(2).sum().sqrt()) / total  # delta method
    return Estimate(value, stderr, _ess(w))


def direct_method(q_target: torch.Tensor) -> Estimate:
    """The direct model's value of ``pi``: ``mean(q_pi(x_n))`` for ``q_target [N]`` (no weights)."""
    q = _as_columns(q_target=q_target)["q_target"]
    return _mean_estimate(q, torch.ones_like(q))


def doubly_robust(
    reward: torch.Tensor,
    target_prob: torch.Tensor,
    behavior_prob: torch.Tensor,
    q_logged: torch.Tensor,
    q_target: torch.Tensor,
) -> Estimate:
    """Doubly robust ``mean(q_pi(x) + w (r - q(x, a)))``.

    Args:
        reward, target_prob, behavior_prob: as :func:`ips` (``[N]`` each).
        q_logged: the direct model's reward of the logged action ``q(x_n, a_n)`` ``[N]``.
        q_target: the direct model's value of the target policy at ``x_n``, ``sum_a pi(a|x_n) q(x_n, a)`` ``[N]``.
    """
    w = importance_weights(target_prob, behavior_prob)
    cols = _as_columns(reward=reward, q_logged=q_logged, q_target=q_target, weight=w)
    terms = cols["q_target"] + w * (cols["reward"] - cols["q_logged"])
    return _mean_estimate(terms, w)


def policy_expectation(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_a probs[n, a] values[n, a]`` ``[N, A] -> [N]`` (``q_pi`` of :func:`doubly_robust`), in fp64."""
    if probs.shape != values.shape or probs.dim() != 2:
        raise RecpostError(f"policy_expectation: probs and values must both be [N, A], got {tuple(probs.shape)} and "
                           f"{tuple(values.shape)}")
    return (probs.double() * values.double()).sum(-1)


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's tau-b of aligned ``a [N]`` and ``b [N]``: ``(concordant - discordant)`` pairs over
    ``sqrt((pairs - ties in a) (pairs - ties in b))``, so ties count as neither (scipy's ``kendalltau``);
    NaN for fewer than two values, a constant side or a NaN value. ``O(N^2)``: for a handful of policies."""
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    if len(a) != len(b):
        raise RecpostError(f"kendall_tau: a and b must be aligned, got lengths {len(a)} and {len(b)}")
    upper = torch.triu(torch.ones(len(a), len(a), dtype=torch.bool), diagonal=1)  # each pair once
    da, db = torch.sign(a[:, None] - a[None, :])[upper], torch.sign(b[:, None] - b[None, :])[upper]
    untied_a, untied_b = float((da != 0).sum()), float((db != 0).sum())
    if untied_a == 0 or untied_b == 0:
        return math.nan
    return float((da * db).sum()) / math.sqrt(untied_a * untied_b)


def ranking_agreement(estimated: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """How well ``estimated [P]`` values of ``P`` policies rank them against their ``true [P]`` values.

    Returns ``kendall_tau`` (tau-b), ``pairs_in_order`` (the share of the pairs the truth orders strictly
    that the estimates order the same way; a NaN estimate orders nothing) and ``best_found`` (1.0 when
    the policy with the highest estimate has the highest true value, else 0.0; NaN without policies).
    """
    estimated, true = torch.as_tensor(estimated).double().flatten(), torch.as_tensor(true).double().flatten()
    if len(estimated) != len(true):
        raise RecpostError(f"ranking_agreement: estimated and true must be aligned, got lengths {len(estimated)} "
                           f"and {len(true)}")
    upper = torch.triu(torch.ones(len(true), len(true), dtype=torch.bool), diagonal=1)
    d_true = torch.sign(true[:, None] - true[None, :])[upper]
    d_est = torch.sign(estimated[:, None] - estimated[None, :])[upper]  # NaN where an estimate is NaN
    ordered = d_true != 0
    in_order = float((d_est[ordered] == d_true[ordered]).double().mean()) if bool(ordered.any()) else math.nan
    finite = torch.isfinite(estimated)
    best = math.nan
    if len(true) and bool(finite.any()):
        best = float(true[estimated.masked_fill(~finite, -math.inf).argmax()] == true.max())
    return {"kendall_tau": kendall_tau(estimated, true), "pairs_in_order": in_order, "best_found": best}
