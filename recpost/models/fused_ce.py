"""Next-item cross-entropy over the whole catalog without materialising ``[N, n_items + 1]`` logits.

``F.cross_entropy(hidden @ weights.T, targets)`` keeps the logits, their log-softmax and its gradient
as three ``[N, V]`` tensors (V = catalog + padding): on a CPU those passes over memory, not the matmul,
are most of a training step (ML-1M (users 1-2,999), batch 64 x 200 positions: 12,800 x 3,616 floats,
185 MB each). :class:`LinearCrossEntropy` does the same arithmetic a block of rows at a time, so each
block's logits stay in cache: the forward keeps only the ``logsumexp`` per row, the backward recomputes
the block's logits and turns them in place into the gradient ``g * (softmax - onehot)``. One more matmul,
far less memory traffic (measured in the README's "Time to quality on ML-1M" section).

When the loss is a fixed linear combination ``sum_i c_i ce_i`` of the rows (SFT's mean, ExpSFT's and the
other weighted methods' ``w_i / N``: coefficients that do not depend on the parameters),
:class:`WeightedLinearCrossEntropy` computes the gradients in the forward, while each block's logits are in
cache, from one softmax pass: three matmuls and one ``exp`` per block instead of four and two; the
backward only scales them by the upstream gradient (Liger's fused linear cross-entropy does the same on
GPUs).

Written by hand, not taken from a library: the fused kernels that exist (Liger's fused linear
cross-entropy, Apple's Cut Cross-Entropy) are Triton/CUDA only, and recpost trains on CPUs too.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

BLOCK_ELEMENTS = 1 << 21  # logits per block: 8 MB of fp32, a block that stays in a CPU's L2/L3 cache
MIN_ROWS, MAX_ROWS = 64, 4096  # rows per block, whatever the catalog (a thin block wastes the matmul)


def block_rows(n_columns: int) -> int:
    """Rows per block for a catalog of ``n_columns`` (items + padding)."""
    return max(MIN_ROWS, min(MAX_ROWS, BLOCK_ELEMENTS // max(n_columns, 1)))


def row_blocks(n_rows: int, n_columns: int) -> Iterator[slice]:
    """Consecutive row slices of ``n_rows`` whose ``[rows, n_columns]`` logits stay in cache (:func:`block_rows`)."""
    rows = block_rows(n_columns)
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


def _block_logits(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weights.T  # [rows, V]
    logits[:, 0] = float("-inf")  # the padding item is never a next item
    return logits


class LinearCrossEntropy(torch.autograd.Function):
    """``ce [N] = logsumexp_{v >= 1}(hidden @ weights.T) - hidden . weights[targets]`` with its gradients
    for ``hidden [N, d]`` and ``weights [V, d]`` (fp32; column 0 is padding, excluded)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = hidden.new_empty(hidden.shape[0])
        for block in row_blocks(hidden.shape[0], weights.shape[0]):
            lse[block] = torch.logsumexp(_block_logits(hidden[block], weights), dim=-1)
        ctx.save_for_backward(hidden, weights, targets, lse)
        return lse - (hidden * weights[targets]).sum(-1)

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        hidden, weights, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weights = torch.zeros_like(weights)
        for block in row_blocks(hidden.shape[0], weights.shape[0]):
            h, g = hidden[block], grad_ce[block]
            # softmax (exp(z - lse)) times the upstream gradient, minus it at the target: d ce / d logits
            grad_logits = _block_logits(h, weights).sub_(lse[block, None]).exp_().mul_(g[:, None])
            grad_logits[torch.arange(h.shape[0], device=h.device), targets[block]] -= g
            grad_hidden[block] = grad_logits @ weights
            grad_weights.addmm_(grad_logits.T, h)
        return grad_hidden, grad_weights, None


class WeightedLinearCrossEntropy(torch.autograd.Function):
    """``loss = sum_i coefficients_i * ce_i`` (a scalar, with its gradients for ``hidden [N, d]`` and
    ``weights [V, d]``) and ``ce [N]`` (no gradient), for ``coefficients [N]`` that are constants of the loss."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor,
                coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        want_hidden, want_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ce = hidden.new_empty(hidden.shape[0])
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weights = torch.zeros_like(weights) if want_weights else None
        for block in row_blocks(hidden.shape[0], weights.shape[0]):
            h, c, t = hidden[block], coefficients[block], targets[block, None]
            logits = _block_logits(h, weights)  # [rows, V]
            target_logit = logits.gather(1, t).squeeze(1)
            top = logits.amax(-1, keepdim=True)
            exp = logits.sub_(top).exp_()  # in place: the block's only [rows, V] tensor
            total = exp.sum(-1)
            ce[block] = top.squeeze(1) + total.log() - target_logit
            if want_hidden or want_weights:
                # d loss / d logits = c (softmax - onehot), softmax = exp / total
                grad_logits = exp.mul_((c / total)[:, None])
                grad_logits.scatter_add_(1, t, -c[:, None])
                if want_hidden:
                    grad_hidden[block] = grad_logits @ weights
                if want_weights:
                    grad_weights.addmm_(grad_logits.T, h)
        ctx.mark_non_differentiable(ce)
        ctx.save_for_backward(grad_hidden, grad_weights)
        return (coefficients * ce).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_ce: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weights = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss,
                None if grad_weights is None else grad_weights * grad_loss, None, None)


def weighted_linear_cross_entropy(hidden: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor,
                                  coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(coefficients * ce), ce [N])`` for the rows' cross-entropy ``ce`` of :func:`linear_cross_entropy`
    and ``coefficients [N]`` that the loss treats as constants (they are detached); the loss's gradients are
    computed in the forward (one softmax pass per block), ``ce`` carries none."""
    return WeightedLinearCrossEntropy.apply(hidden, weights, targets, coefficients.detach().to(hidden.dtype))


def linear_cross_entropy(hidden: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy ``[N]`` of ``softmax(hidden @ weights.T)`` (column 0 excluded) at ``targets [N]``;
    equals ``F.cross_entropy`` of the masked logits up to float rounding, in ``O(block x V)`` memory."""
    return LinearCrossEntropy.apply(hidden, weights, targets)
