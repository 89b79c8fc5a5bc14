"""The paper's guarantees for the tilted policy ``pi_lambda ∝ pi_beta exp(r_hat / lambda)``, as numbers.

With zero-mean, independent, ``sigma``-sub-Gaussian errors on the estimated reward of each of the
``|A|`` actions at a state, with probability at least ``1 - delta`` every error is below

    eps = sigma * sqrt(2 log(2 |A| / delta))                       (a union bound over the actions)

and the policy tilted by the estimated rewards keeps

    V(pi_lambda) >= V(pi_beta) - 2 eps                              (Theorem 4.3)
    V(pi_lambda) >= V(pi_beta) - R_max (exp(2 eps / lambda) - 1)    (Theorem 4.4, rewards in [0, R_max])

so a tolerated loss ``tau`` is guaranteed by ``lambda >= 2 eps / log(1 + tau / R_max)``. The catalog
enters only through ``log |A|``. Values are differences, so rewards on ``[r_min, r_max]`` use
``R_max = r_max - r_min`` (1..5 stars: 4). These are statements about the ideal tilted policy at a
state inside ``pi_beta``'s support, not about a trained model; ``python -m recpost.diagnostics.bandit_check
--grid`` sets them against measured values. A bound below the worst possible value (every action's
lowest reward) is vacuous: :func:`vacuous` says when.
"""

from __future__ import annotations

import math

from recpost.core.errors import RecpostError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RecpostError(message)


def eps(sigma: float, n_actions: int, delta: float = 0.05) -> float:
    """``sigma * sqrt(2 log(2 |A| / delta))``: the largest reward-estimate error over ``|A|`` actions
    with probability ``>= 1 - delta`` (sub-Gaussian tails and a union bound)."""
    _check(sigma >= 0 and math.isfinite(sigma), f"sigma must be >= 0 and finite (got {sigma}); it is the noise std")
    _check(int(n_actions) == n_actions and n_actions >= 1, f"n_actions must be a positive integer (got {n_actions})")
    _check(0 < delta < 1, f"delta must be in (0, 1) (got {delta}); 0.05 gives a 95% guarantee")
    return sigma * math.sqrt(2.0 * math.log(2.0 * n_actions / delta))


def additive_lower_bound(value_behavior: float, epsilon: float) -> float:
    """Theorem 4.3: ``V(pi_beta) - 2 eps``, whatever ``lambda``."""
    _check(epsilon >= 0, f"eps must be >= 0 (got {epsilon})")
    return value_behavior - 2.0 * epsilon


def tilted_lower_bound(value_behavior: float, epsilon: float, lam: float, r_max: float) -> float:
    """Theorem 4.4: ``V(pi_beta) - R_max (exp(2 eps / lambda) - 1)`` for rewards in ``[0, R_max]``
    (``-inf`` where the exponential overflows: no guarantee at all)."""
    _check(epsilon >= 0, f"eps must be >= 0 (got {epsilon})")
    _check(lam > 0, f"lambda must be > 0 (got {lam})")
    _check(r_max > 0, f"R_max must be > 0 (got {r_max}); it is the width of the reward range")
    x = 2.0 * epsilon / lam
    return value_behavior - r_max * math.expm1(x) if x < 700 else -math.inf


def lambda_for_loss(epsilon: float, tolerated_loss: float, r_max: float) -> float:
    """The smallest ``lambda`` for which Theorem 4.4 guarantees ``V(pi_lambda) >= V(pi_beta) - tau``:
    ``2 eps / log(1 + tau / R_max)`` (0 when ``eps = 0``: any lambda is safe)."""
    _check(epsilon >= 0, f"eps must be >= 0 (got {epsilon})")
    _check(tolerated_loss > 0, f"the tolerated loss must be > 0 (got {tolerated_loss})")
    _check(r_max > 0, f"R_max must be > 0 (got {r_max})")
    return 2.0 * epsilon / math.log1p(tolerated_loss / r_max)


def vacuous(bound: float, worst_value: float) -> bool:
    """A lower bound at or below the worst value any policy can have says nothing."""
    return bound <= worst_value
