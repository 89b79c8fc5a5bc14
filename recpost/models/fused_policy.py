"""PPO's catalog-wide terms a block of states at a time, never as ``[states, n_items + 1]`` tensors.

A PPO update needs, per state, the log-probability of its k sampled items under the masked softmax over
the catalog, the exact ``KL(pi || pi_ref)`` against the rollout's reference log-probs and (with an
entropy bonus) the entropy. Written with autograd on ``[N, V]`` tensors that is a dozen passes over
memory forward and back (masking the history, log-softmax, exp, where, products, sums and their
gradients): on a CPU most of a PPO step. :class:`PolicyCatalogTerms` does the same arithmetic a block
of rows at a time, so each block stays in cache, and writes its gradient by hand: with ``z`` the logits,
``p`` the masked softmax, ``d = log p - log q`` and the upstream gradients ``g_a`` (of each sampled
``log p(a)``), ``g_kl`` and ``g_H``::

    dL/dz_j = p_j * (g_kl * (d_j - KL) - g_H * (log p_j + H) - sum_a g_a) + sum_a g_a [j = a]

Masked items (padding, the state's history) have ``p = 0`` and their ``d`` and ``log p`` set to 0, so
they take no gradient and no NaN. Written by hand for the same reason as :mod:`recpost.models.fused_ce`:
no CPU library fuses these.
"""

from __future__ import annotations

import torch

from recpost.models.fused_ce import row_blocks

NEG_INF = float("-inf")


def history_index(history: torch.Tensor | None, n_columns: int) -> torch.Tensor | None:
    """Where the ``history [r, K]`` items (0 = none) of a block of ``r`` states lie in its row-major
    ``[r, n_columns]`` logits: flat indices ``[nnz]``. Built once per block and used for every mask of it:
    a history row is mostly zeros (states early in their window), which ``scatter_`` would write too
    (4x the work on ML-100K)."""
    if history is None:
        return None
    rows, cols = history.nonzero(as_tuple=True)
    return rows * n_columns + history[rows, cols]


def _mask(x: torch.Tensor, masked: torch.Tensor | None, value: float) -> torch.Tensor:
    """Contiguous ``x [r, V]`` with padding (column 0) and the ``masked`` flat indices (:func:`history_index`)
    set to ``value``, in place."""
    x[:, 0] = value
    if masked is not None:
        x.view(-1).index_fill_(0, masked, value)
    return x


def block_log_probs(
    hidden: torch.Tensor, weights: torch.Tensor, masked: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p [r, V], logsumexp [r])`` of the masked softmax of ``hidden [r, d] @ weights.T`` (fp32),
    the ``masked`` items (:func:`history_index` of the block's history) and padding at -inf. The one
    definition the rollout and :class:`PolicyCatalogTerms` share, so a first update's ratio is exactly 1."""
    logits = _mask(hidden @ weights.T, masked, NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)
    return logits.sub_(lse[:, None]), lse


def _kl_entropy_parts(logp: torch.Tensor, ref: torch.Tensor | None, masked: torch.Tensor | None):
    """``(p, log p, d = log p - log q)`` of one block, masked items at 0 in ``log p`` and ``d`` (``d``: None
    without ``ref``)."""
    p = logp.exp()
    logp0 = _mask(logp, masked, 0.0)  # in place: the caller has gathered what it needs from logp
    d = _mask(logp0 - ref, masked, 0.0) if ref is not None else None
    return p, logp0, d


class PolicyCatalogTerms(torch.autograd.Function):
    """``(log p(actions) [N, k], KL(p || q) [N], H(p) [N])`` of the masked softmax ``p`` of
    ``hidden [N, d] @ weights.T`` (fp32) against the reference ``ref_logp [N, V]`` (``None``: KL 0), with
    their gradients for ``hidden`` and ``weights``; the entropy only ``with_entropy`` (else 0)."""

    @staticmethod
    def forward(ctx, hidden, weights, history, actions, ref_logp, with_entropy: bool):
        n = hidden.shape[0]
        lse, logp_a = hidden.new_empty(n), hidden.new_empty(actions.shape)
        kl, ent = hidden.new_zeros(n), hidden.new_zeros(n)
        ctx.masked = []  # each block's history_index, for the backward (not tensors autograd must track)
        for b in row_blocks(n, weights.shape[0]):
            hist = history_index(history[b] if history is not None else None, weights.shape[0])
            ctx.masked.append(hist)
            logp, lse[b] = block_log_probs(hidden[b], weights, hist)
            logp_a[b] = logp.gather(1, actions[b])
            if ref_logp is None and not with_entropy:
                continue
            p, logp0, d = _kl_entropy_parts(logp, ref_logp[b] if ref_logp is not None else None, hist)
            if d is not None:
                kl[b] = (p * d).sum(-1)
            if with_entropy:
                ent[b] = -(p * logp0).sum(-1)
        ctx.save_for_backward(hidden, weights, actions, ref_logp, lse, kl, ent)
        ctx.with_entropy = with_entropy
        ctx.mark_non_differentiable(*(() if ref_logp is not None else (kl,)), *(() if with_entropy else (ent,)))
        return logp_a, kl, ent

    @staticmethod
    def backward(ctx, grad_logp_a, grad_kl, grad_ent):
        hidden, weights, actions, ref_logp, lse, kl, ent = ctx.saved_tensors
        grad_hidden, grad_weights = torch.empty_like(hidden), torch.zeros_like(weights)
        g_a_sum = grad_logp_a.sum(-1)
        for b, hist in zip(row_blocks(hidden.shape[0], weights.shape[0]), ctx.masked):
            h = hidden[b]
            logp = _mask(h @ weights.T, hist, NEG_INF).sub_(lse[b, None])
            p, logp0, d = _kl_entropy_parts(logp, ref_logp[b] if ref_logp is not None else None, hist)
            # the bracket of the module docstring, built in place in the block that holds d (or log p)
            if d is not None:
                bracket = d.sub_(kl[b, None]).mul_(grad_kl[b, None])
                if ctx.with_entropy:
                    bracket.sub_(logp0.add_(ent[b, None]).mul_(grad_ent[b, None]))
            elif ctx.with_entropy:
                bracket = logp0.add_(ent[b, None]).mul_(-grad_ent[b, None])
            else:
                bracket = torch.zeros_like(p)
            grad_logits = bracket.sub_(g_a_sum[b, None]).mul_(p)
            grad_logits.scatter_add_(1, actions[b], grad_logp_a[b])
            grad_hidden[b] = grad_logits @ weights
            grad_weights.addmm_(grad_logits.T, h)
        return grad_hidden, grad_weights, None, None, None, None


def policy_catalog_terms(
    hidden: torch.Tensor, weights: torch.Tensor, history: torch.Tensor | None, actions: torch.Tensor,
    ref_logp: torch.Tensor | None = None, with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p(actions) [N, k], KL(p || q) [N], H(p) [N])`` in ``O(block x V)`` working memory; equals
    ``masked_log_probs`` followed by ``gather``, ``exact_kl`` and ``entropy`` up to float rounding."""
    return PolicyCatalogTerms.apply(hidden, weights, history, actions, ref_logp, with_entropy)
