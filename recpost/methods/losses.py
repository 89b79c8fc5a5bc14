"""Pure loss pieces shared by methods (easy to test by hand).

Everything here works in fp32 regardless of autocast: exponentials and log-probabilities over the
catalog lose too much precision in bf16.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from recpost.errors import RecpostError

WeightNorm = Literal["batch_mean", "none"]
WEIGHT_NORMS = get_args(WeightNorm)

# exp() overflows fp32 above ~88.7; without normalisation, weights beyond this are not representable.
_MAX_LOG_WEIGHT = 80.0


def exp_reward_weights(
    rewards: torch.Tensor,
    lam: float,
    normalize: WeightNorm = "batch_mean",
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
    normalize: WeightNorm = "batch_mean",
    max_weight: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exp-weighted SFT loss ``mean(w * CE)`` for ``logits [N, V]``, ``targets [N]``, ``rewards [N]``.

    Returns ``(loss, weights [N], ce [N])``. Its population optimum is
    ``pi(a|s) ∝ pi_beta(a|s) * exp(r(s, a) / lam)``; with ``lam -> inf`` it is plain cross-entropy.
    """
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    loss, weights = exp_weighted_loss(ce, rewards, lam, normalize, max_weight)
    return loss, weights, ce


def exp_weighted_loss(
    ce: torch.Tensor,
    rewards: torch.Tensor,
    lam: float,
    normalize: WeightNorm = "batch_mean",
    max_weight: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean(w * ce), w)`` for per-target cross-entropies ``ce [N]`` (full or sampled softmax) and ``rewards [N]``.

    The weighting does not care how ``ce`` was computed: with a sampled softmax it multiplies the
    sampled cross-entropy, so ``lam -> inf`` is SFT with the same sampled softmax.
    """
    if not torch.isfinite(rewards).all():
        raise RecpostError("NaN or infinite rewards in the batch; check the ratings and data.reward_transform")
    weights = exp_reward_weights(rewards, lam, normalize, max_weight)
    return (weights * ce.float()).mean(), weights


# ------------------------------------------------------------------------------------- sampled softmax
# Added to every item's training count before normalising popularity: every catalog item can be drawn
# as a negative (and has a finite log-probability), also items seen only in validation or test.
POPULARITY_SMOOTHING = 1.0


def popularity_log_q(item_counts: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[n_items + 1]`` of the popularity sampler from training counts ``[n_items + 1]``:
    ``q(i) ∝ count(i) + POPULARITY_SMOOTHING`` for items ``1..n_items``; padding (0) is never drawn (``-inf``)."""
    counts = item_counts.double().clamp(min=0) + POPULARITY_SMOOTHING
    counts[0] = 0.0
    return (counts / counts.sum()).log().float()


def sample_negatives(
    num_negatives: int, n_items: int, log_q: torch.Tensor | None = None, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_negatives`` item ids ``[K]`` drawn i.i.d. (with replacement) from ``q`` and their ``log q [K]``.

    ``log_q [n_items + 1]`` from :func:`popularity_log_q`, or ``None`` for uniform over ``1..n_items``.
    Drawing with replacement keeps ``log q`` exact for the logQ correction (no inclusion probabilities).
    """
    if num_negatives < 1:
        raise RecpostError(f"num_negatives must be >= 1 (got {num_negatives})")
    if log_q is None:
        negatives = torch.randint(1, n_items + 1, (num_negatives,), generator=generator, device=device)
    else:
        negatives = torch.multinomial(log_q.exp(), num_negatives, replacement=True, generator=generator)
    return negatives, sampling_log_q(negatives, n_items, log_q)


def sampling_log_q(items: torch.Tensor, n_items: int, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """``log q`` of ``items`` (any shape) under the sampler: ``log_q[items]``, or uniform ``-log n_items``."""
    if log_q is None:
        return torch.full(items.shape, -math.log(n_items), device=items.device)
    return log_q[items]


def sampled_softmax_cross_entropy(
    target_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    log_q_targets: torch.Tensor,
    log_q_negatives: torch.Tensor,
) -> torch.Tensor:
    """Per-target sampled-softmax cross-entropy ``[N]`` with logQ correction, in fp32.

    ``target_logits [N]``, ``negative_logits [N, K]`` (K negatives shared by the batch), ``targets [N]``,
    ``negatives [K]``, and the log sampling probabilities ``log_q_targets [N]``, ``log_q_negatives [K]``.
    Every candidate's logit is corrected by ``- log q`` (the target's too), which makes the softmax over
    ``{target} + negatives`` a consistent estimate of the full one (Bengio & Senecal 2008; Yi et al. 2019);
    a negative that is the row's own target (an accidental hit) is removed (``-inf``).
    """
    with torch.autocast(device_type=target_logits.device.type, enabled=False):
        positive = target_logits.float() - log_q_targets.float()  # [N]
        negative = negative_logits.float() - log_q_negatives.float()  # [N, K]
        negative = negative.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([positive[:, None], negative], dim=1)  # [N, 1 + K]; the target is class 0
        return torch.logsumexp(logits, dim=1) - positive
