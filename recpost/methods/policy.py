"""A recommender as a policy over the catalog: what PPO, DPO and the reward-hacking diagnostics share.

Pure functions on tensors (easy to test by hand), all in fp32 whatever the autocast:

- ``state_history`` / ``masked_log_probs``: ``log pi(i | state)`` over the whole catalog with the
  items the user already had (and padding) at probability 0: the window's items up to the state *and*
  the user's items before the window (``earlier_items`` of the batch), as evaluation masks them; the
  history is an index list per state, so masking costs nothing per catalog item;
- ``sample_items``: k items per state from such a distribution (Gumbel-top-k without replacement, or
  i.i.d. with replacement); masked items are never returned;
- ``exact_kl`` / ``entropy``: over the catalog, affordable for catalogs up to ~10^5 items;
  ``kl_k1`` / ``kl_k3``: Schulman's sampled estimators of ``KL(p || q)`` from ``a ~ p`` (as in TRL);
- ``top_k_reward``: mean reward of a ranking's top-k (``rm_reward@10``).
"""

from __future__ import annotations

import torch
from torch import nn

from recpost.core.batch import TrainBatch
from recpost.core.errors import RecpostError

NEG_INF = float("-inf")


def masked_log_probs(logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax`` over the catalog in fp32 with the ``history`` items (and padding) at ``-inf``.

    ``logits [N, V + 1]``, ``history [N, K]`` item ids per row (0 = none; from :func:`state_history`)
    -> ``[N, V + 1]``. Index lists, not a dense ``[N, V + 1]`` mask: the cost is ``N x K`` whatever the
    catalog size. Padding (column 0) is always excluded.
    """
    logits = logits.float()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        # padding first, whatever the history holds (a row without a 0 entry would leave it unmasked)
        logits = logits.index_fill(-1, torch.zeros(1, dtype=torch.long, device=logits.device), NEG_INF)
        if history is not None:
            logits = logits.scatter(1, history, NEG_INF)
        return logits.log_softmax(dim=-1)


def sample_items(
    logp: torch.Tensor, k: int, replacement: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``k`` items per row of ``logp [N, V + 1]`` (``-inf`` = excluded) -> ``[N, k]`` item ids.

    Without replacement: Gumbel-top-k (exact sampling without replacement in one ``topk``); every row
    needs ``k`` allowed items. With replacement: ``k`` i.i.d. draws (``torch.multinomial``).
    """
    allowed = torch.isfinite(logp).sum(dim=-1)  # [N]
    if logp.shape[0] and int(allowed.min()) < (k if not replacement else 1):
        raise RecpostError(
            f"cannot sample {k} items: a state has only {int(allowed.min())} items it has not had; use a smaller k"
        )
    logp = logp.float()
    if not replacement:
        u = torch.rand(logp.shape, generator=generator, device=logp.device).clamp_(min=torch.finfo(torch.float32).tiny)
        gumbel = -torch.log(-torch.log(u))
        return (logp + gumbel).topk(k, dim=-1).indices
    samples = torch.multinomial(logp.exp(), k, replacement=True, generator=generator)  # [N, k]
    # Guard against float round-off in multinomial's cumulative sums picking a zero-probability item.
    bad = ~torch.isfinite(logp.gather(1, samples))
    if bad.any():
        samples = torch.where(bad, logp.argmax(dim=-1, keepdim=True).expand_as(samples), samples)
    return samples


def exact_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_i p_i (log p_i - log q_i)`` over the last dim, ``[N, V] -> [N]``.

    Items outside p's support contribute 0 (with zero gradient, no NaN); items in p's support but not
    in q's make it infinite, as they should.
    """
    support = torch.isfinite(logp)
    diff = torch.where(support, logp - logq, torch.zeros_like(logp))
    return (logp.exp() * diff).sum(dim=-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """``H(p) = -sum_i p_i log p_i`` over the last dim, ``[N, V] -> [N]`` (excluded items contribute 0)."""
    support = torch.isfinite(logp)
    return -(logp.exp() * torch.where(support, logp, torch.zeros_like(logp))).sum(dim=-1)


def kl_k1(logp_a: torch.Tensor, logq_a: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of ``KL(p || q)`` from one ``a ~ p``: ``log p(a) - log q(a)`` (can be negative)."""
    return logp_a - logq_a


def kl_k3(logp_a: torch.Tensor, logq_a: torch.Tensor) -> torch.Tensor:
    """Unbiased, non-negative, lower-variance estimate of ``KL(p || q)`` from one ``a ~ p``:
    ``(r - 1) - log r`` with ``r = q(a) / p(a)`` (Schulman's k3; TRL's ``kl_estimator: k3``)."""
    log_r = logq_a - logp_a
    return torch.expm1(log_r) - log_r


def top_k_reward(rewards: torch.Tensor, scores: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Mean of ``rewards [B, V + 1]`` over the top-``k`` items of ``scores [B, V + 1]`` (already masked) -> ``[B]``."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices  # [B, k]
    return rewards.float().gather(1, top).mean(dim=-1)


def state_positions(batch: TrainBatch, which: str) -> torch.Tensor:
    """Positions of training windows used as bandit states ``[B, L]`` bool: ``all`` positions that have a
    logged next item (the states SFT and exp-weighted SFT train on), or only the ``last`` (newest) one."""
    has_target = batch["next_items"] > 0  # [B, L]
    if which == "all":
        return has_target
    if which == "last":
        last = torch.zeros_like(has_target)
        last[:, -1] = has_target[:, -1]
        return last
    raise RecpostError(f"state_positions must be 'all' or 'last' (got {which!r})")


def state_history(items: torch.Tensor, states: torch.Tensor, earlier: torch.Tensor | None = None) -> torch.Tensor:
    """What the user has had at each state, as item ids ``[N, H + L]`` (0 = nothing): the user's
    ``earlier [B, H]`` items before the window, then the window's ``items [B, L]`` up to the state.
    ``states [B, L]`` bool picks the N states (row-major, as ``hidden[states]``)."""
    rows, cols = states.nonzero(as_tuple=True)  # [N], [N]
    window = items[rows]  # [N, L]
    window = window.masked_fill(torch.arange(items.shape[1], device=items.device)[None, :] > cols[:, None], 0)
    if earlier is None or not earlier.shape[1]:
        return window
    return torch.cat([earlier[rows], window], dim=1)


def state_log_probs(
    backbone: nn.Module, items: torch.Tensor, ratings: torch.Tensor | None, states: torch.Tensor,
    mask_history: bool = True, earlier: torch.Tensor | None = None, timestamps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi(. | state)`` over the catalog at the ``states [B, L]`` positions of ``items [B, L]``.

    Returns ``(logp [N, V + 1], hidden [N, d])``; what the user had by each state (the window's items up
    to it and the ``earlier [B, H]`` items before the window) and padding have probability 0, unless
    ``mask_history`` is off (then only padding).
    """
    hidden = backbone.encode(items, ratings, timestamps)[states]  # [N, d]
    history = state_history(items, states, earlier) if mask_history else None  # [N, H + L]
    return masked_log_probs(backbone.score(hidden), history), hidden
