"""Pure loss pieces shared by methods (easy to test by hand).

Everything here works in fp32 regardless of autocast: exponentials and log-probabilities over the
catalog lose too much precision in bf16.
"""

from __future__ import annotations

from typing import Literal

import torch

from recpost.errors import RecpostError

# exp() overflows fp32 above ~88.7; without normalisation, weights beyond this are not representable.
_MAX_LOG_WEIGHT = 80.0


def exp_reward_weights(
    rewards: torch.Tensor,
    lam: float,
    normalize: Literal["batch_mean", "none"] = "batch_mean",
    max_weight: float | None = None,
) -> torch.Tensor:
    """Weights ``w = exp(r / lam)`` of exponential reward-weighted SFT, ``[N] -> [N]``.

    ``batch_mean`` divides by the batch mean, computed in log space (``log w - logsumexp + log N``)
    so it is exact and finite for any ``lam > 0``: a constant factor on all weights does not move the
    optimum ``pi_beta * exp(r / lam)``. ``none`` returns the raw weights (stable only while
    ``max r / lam`` stays below ~80; an error says so). ``max_weight`` clips after normalising.
    """
    if lam <= 0:
        raise RecpostError(f"lam must be > 0 (got {lam}); large lam approaches plain SFT, small lam is greedier")
    rewards = rewards.float()  # [N]
    if normalize == "batch_mean":
        # Shift by the max reward before dividing by lam: exact for tiny lam (no large fp32 logits).
        shifted = (rewards - rewards.max()) / lam  # <= 0
        n = torch.tensor(float(rewards.numel()), device=rewards.device)
        weights = torch.exp(shifted - torch.logsumexp(shifted, dim=0) + n.log())
    elif normalize == "none":
        log_w = rewards / lam
        if log_w.numel() and log_w.max() > _MAX_LOG_WEIGHT:
            raise RecpostError(
                f"exp(r / lam) overflows for lam={lam} (max r / lam = {log_w.max().item():.0f}); use "
                "weight_norm: batch_mean or a larger lam"
            )
        weights = torch.exp(log_w)
    else:
        raise RecpostError(f"weight_norm must be batch_mean or none (got {normalize!r})")
    if max_weight is not None:
        weights = weights.clamp(max=max_weight)
    return weights


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size as a share of the batch, in (0, 1]: ``(sum w)^2 / (N sum w^2)``."""
    w = weights.float()
    return w.sum() ** 2 / (w.numel() * (w**2).sum()).clamp_min(torch.finfo(torch.float32).tiny)


def exp_weighted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rewards: torch.Tensor,
    lam: float,
    normalize: Literal["batch_mean", "none"] = "batch_mean",
    max_weight: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exp-weighted SFT loss ``mean(w * CE)`` for ``logits [N, V]``, ``targets [N]``, ``rewards [N]``.

    Returns ``(loss, weights [N], ce [N])``. Its population optimum is
    ``pi(a|s) ∝ pi_beta(a|s) * exp(r(s, a) / lam)``; with ``lam -> inf`` it is plain cross-entropy.
    """
    if not torch.isfinite(rewards).all():
        raise RecpostError("NaN or infinite rewards in the batch; check the ratings and data.reward_transform")
    weights = exp_reward_weights(rewards, lam, normalize, max_weight)
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return (weights * ce).mean(), weights, ce
