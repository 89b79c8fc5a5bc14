"""Pure loss pieces shared by methods (easy to test by hand).

Everything here works in fp32 regardless of autocast: exponentials and log-probabilities over the
catalog lose too much precision in bf16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch

from recpost.core.errors import RecpostError

WeightNorm = Literal["batch_mean", "none", "fixed"]
WEIGHT_NORMS = get_args(WeightNorm)

# ``[k]`` statistics of this process -> ``[P, k]``, one row per process (``P = 1`` without DDP): how the
# weights of ``batch_mean`` see the whole global batch. ``None`` is one process.
Gather = Callable[[torch.Tensor], torch.Tensor]

# exp() overflows fp32 above ~88.7; without normalisation, weights beyond this are not representable.
_MAX_LOG_WEIGHT = 80.0


def _one_process(stats: torch.Tensor) -> torch.Tensor:
    return stats[None]


def exp_reward_weights(
    rewards: torch.Tensor,
    lam: float,
    normalize: WeightNorm = "batch_mean",
    max_weight: float | None = None,
    reward_max: float | None = None,
    gather: Gather | None = None,
) -> torch.Tensor:
    """Weights ``w = exp(r / lam)`` of exponential reward-weighted SFT, ``[N] -> [N]``.

    ``r`` is any per-target signal: the reward (ExpSFT) or an advantage (A-SFT).

    - ``none``: the raw ``exp(r / lam)`` (the paper's Algorithm 1; stable only while ``max r / lam``
      stays below ~80, an error says so).
    - ``batch_mean``: divided by their mean over the global batch (every process's targets, through
      ``gather``), computed after subtracting the batch's largest reward, so it is exact and finite for
      any ``lam > 0``. A data-dependent normaliser: with small batches it biases the optimum (the
      weight of a target depends on the others drawn with it; ``tests/test_weight_norm.py``).
    - ``fixed``: ``exp((r - reward_max) / lam)``, the raw weight over that of the largest possible
      reward: a constant factor, so the optimum ``pi_beta * exp(r / lam)`` is kept exactly, and the
      weights stay in (0, 1] for any ``lam``.

    ``max_weight`` clips after normalising.
    """
    if lam <= 0:
        raise RecpostError(f"lam must be > 0 (got {lam}); large lam approaches plain SFT, small lam is greedier")
    rewards = rewards.float()  # [N]
    if normalize == "batch_mean" and gather is None:
        # One process: the batch mean in log space (``log w - logsumexp + log N``), the arithmetic of
        # every release before DDP-global means, so one-process results stay bit for bit the same.
        shifted = (rewards - rewards.max()) / lam  # <= 0
        n = torch.tensor(float(rewards.numel()), device=rewards.device)
        weights = torch.exp(shifted - torch.logsumexp(shifted, dim=0) + n.log())
    elif normalize == "batch_mean":
        weights = _exp_over_global_mean(rewards, lam, gather)
    elif normalize == "none":
        log_w = rewards / lam
        if log_w.numel() and log_w.max() > _MAX_LOG_WEIGHT:
            raise RecpostError(
                f"exp(r / lam) overflows for lam={lam} (max r / lam = {log_w.max().item():.0f}); use "
                "weight_norm: fixed or batch_mean, or a larger lam"
            )
        weights = torch.exp(log_w)
    elif normalize == "fixed":
        weights = torch.exp((rewards - _fixed_bound(reward_max)) / lam)
    else:
        raise RecpostError(f"weight_norm must be one of {', '.join(WEIGHT_NORMS)} (got {normalize!r})")
    if max_weight is not None:
        weights = weights.clamp(max=max_weight)
    return weights


def _exp_over_global_mean(rewards: torch.Tensor, lam: float, gather: Gather) -> torch.Tensor:
    """``exp(r / lam)`` over its mean on every process's targets ``[N]``, from one gather of
    ``(max r, sum exp((r - max r) / lam), N)`` per process; shifting by the largest reward keeps every
    exponent <= 0 (exact for tiny lam, no large fp32 logits)."""
    with torch.no_grad():
        top = rewards.max() if rewards.numel() else rewards.new_tensor(float("-inf"))
        local = torch.exp((rewards - top) / lam).sum()
        stats = gather(torch.stack([top, local, rewards.new_tensor(float(rewards.numel()))]))  # [P, 3]
        best = stats[:, 0].max()
        # each process's sum rescaled to the global shift (a process without targets adds 0)
        total = (stats[:, 1] * torch.exp((stats[:, 0] - best) / lam).nan_to_num(0.0)).sum()
        count = stats[:, 2].sum()
    return torch.exp((rewards - best) / lam) * (count / total)


def linear_reward_weights(
    rewards: torch.Tensor,
    normalize: WeightNorm = "batch_mean",
    max_weight: float | None = None,
    reward_max: float | None = None,
    gather: Gather | None = None,
) -> torch.Tensor:
    """Weights ``w = r`` of linear reward-weighted SFT (the paper's baseline), ``[N] -> [N]``; ``r >= 0``.

    ``none``: ``r``; ``batch_mean``: ``r`` over its mean on the global batch (every process's targets;
    all-zero rewards give zero weights); ``fixed``: ``r / reward_max``. ``max_weight`` clips after
    normalising. Negative rewards have no meaning as weights and are refused.
    """
    rewards = rewards.float()  # [N]
    if rewards.numel() and rewards.min() < 0:
        raise RecpostError(
            f"linear reward weights need rewards >= 0 (got {rewards.min().item():g}); use data.reward_transform: "
            "identity or minmax (centered rewards are negative below the mean)"
        )
    if normalize == "batch_mean":
        with torch.no_grad():
            stats = (gather or _one_process)(torch.stack([rewards.sum(), rewards.new_tensor(float(rewards.numel()))]))
            mean = stats[:, 0].sum() / stats[:, 1].sum()
        weights = rewards / mean.clamp_min(torch.finfo(torch.float32).tiny)
    elif normalize == "none":
        weights = rewards
    elif normalize == "fixed":
        weights = rewards / _fixed_bound(reward_max, positive=True)
    else:
        raise RecpostError(f"weight_norm must be one of {', '.join(WEIGHT_NORMS)} (got {normalize!r})")
    if max_weight is not None:
        weights = weights.clamp(max=max_weight)
    return weights


def _fixed_bound(reward_max: float | None, positive: bool = False) -> float:
    if reward_max is None or not math.isfinite(reward_max) or (positive and reward_max <= 0):
        raise RecpostError(
            f"weight_norm: fixed needs the largest possible reward{' (> 0)' if positive else ''} (got {reward_max}); "
            "train with a RecDataModule (it knows its rating scale) or set model.reward_max"
        )
    return float(reward_max)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor, gather: Gather | None = None) -> torch.Tensor:
    """``sum(weights * values)`` over this process's targets ``[N]``, divided by the global batch's
    target count over the number of processes: under DDP, whose gradient is the mean of the
    processes' gradients, that is exactly the mean over the global batch, however unevenly the
    targets fall on the processes (one process: the plain mean)."""
    return (weights * values.float()).sum() * _mean_scale(values, gather)


def weighted_mean_coefficients(weights: torch.Tensor, gather: Gather | None = None) -> torch.Tensor:
    """``c [N]`` (no gradient) with ``sum(c * values) == weighted_mean(values, weights, gather)``: the
    coefficients of a loss that is linear in its per-target values (the fused cross-entropy's input)."""
    return weights.detach().float() * _mean_scale(weights, gather)


def _mean_scale(values: torch.Tensor, gather: Gather | None) -> torch.Tensor | float:
    """``1 / N`` for this process's ``values [N]``; under DDP (``gather``) the number of processes over the
    global batch's target count (every process must call it)."""
    if gather is None:
        return 1.0 / max(values.numel(), 1)
    with torch.no_grad():
        counts = gather(values.new_tensor([float(values.numel())]))  # [P, 1]
    return counts.shape[0] / counts.sum().clamp_min(1.0)


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
    reward_max: float | None = None,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean(w * ce), w)`` for per-target cross-entropies ``ce [N]`` (full or sampled softmax) and ``rewards [N]``
    (the mean over the global batch with ``gather``, see :func:`weighted_mean`).

    The weighting does not care how ``ce`` was computed: with a sampled softmax it multiplies the
    sampled cross-entropy, so ``lam -> inf`` is SFT with the same sampled softmax.
    """
    check_finite_rewards(rewards)
    weights = exp_reward_weights(rewards, lam, normalize, max_weight, reward_max, gather)
    return weighted_mean(ce, weights, gather), weights


def check_finite_rewards(rewards: torch.Tensor) -> None:
    if not torch.isfinite(rewards).all():
        raise RecpostError("NaN or infinite rewards in the batch; check the ratings and data.reward_transform")


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
