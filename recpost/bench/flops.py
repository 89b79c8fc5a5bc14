"""Analytic matmul FLOPs of an SFT step and the matmul rate of this machine: the two halves of MFU."""

from __future__ import annotations

import statistics
import time

import torch

from recpost.models import BackboneConfig


def sft_step_flops(batch: dict[str, torch.Tensor], backbone: BackboneConfig, n_items: int, useful: bool = False) -> float:
    """Matmul FLOPs of one SASRec SFT training step (full softmax) on ``batch``, counted analytically;
    ``useful``: only the work on real items (each row's valid positions, and their valid x valid
    attention), what the step would cost without any padding.

    Forward: ``2 * m * n * k`` per ``[m, k] @ [k, n]`` matmul; backward twice the forward (gradients
    of both operands), so a step is 3 x forward:

    - dense layers: ``(3 + 1 + 2 * ff_mult) * d^2`` weights per block (qkv, output projection, FFN),
      applied to every one of the ``B * L`` positions (padding included: the encoder computes it);
    - attention: ``Q K^T`` and ``A V``, ``2 * L^2 * d`` each per row and block (the full L x L, as the
      masked kernel computes it);
    - catalog logits: ``[N, d] @ [d, n_items + 1]`` for the N positions that have a target (only those
      reach the output layer).

    Embedding look-ups, layer norms, softmax and the optimiser are not matmuls and are not counted.
    """
    B, L = batch["input_items"].shape
    d = backbone.d_model
    n_targets = int((batch["next_items"] > 0).sum())
    lengths = (batch["input_items"] > 0).sum(1).double() if useful else torch.full((B,), float(L), dtype=torch.float64)
    dense = 2 * float(lengths.sum()) * (4 + 2 * backbone.ff_mult) * d * d
    attention = 2 * 2 * float((lengths**2).sum()) * d
    logits = 2 * n_targets * d * (n_items + 1)
    return 3.0 * (backbone.n_layers * (dense + attention) + logits)


def matmul_flops_per_second(
    batch: dict[str, torch.Tensor], backbone: BackboneConfig, n_items: int, repeats: int = 5
) -> float:
    """FLOPs/s of plain fp32 ``torch`` matmuls with the shapes of the SFT forward pass on ``batch``.

    The same matmuls :func:`sft_step_flops` counts (per block: qkv, attention scores and values,
    projection, FFN; then the catalog logits), on random tensors, timed together; median of
    ``repeats`` after one warm-up. The backward pass runs matmuls of the same sizes, so this is the
    rate a step made only of its matmuls would reach on this machine with the threads torch uses.
    """
    B, L = batch["input_items"].shape
    d, h, ff = backbone.d_model, backbone.n_heads, backbone.ff_mult * backbone.d_model
    n_targets = int((batch["next_items"] > 0).sum())
    x, hidden = torch.randn(B * L, d), torch.randn(B * L, ff)  # [B*L, d], [B*L, ff*d]
    q, k = torch.randn(B * h, L, d // h), torch.randn(B * h, d // h, L)  # per head
    att = torch.randn(B * h, L, L)
    per_block = [
        (x, torch.randn(d, 3 * d)), (q, k), (att, q), (x, torch.randn(d, d)), (x, torch.randn(d, ff)),
        (hidden, torch.randn(ff, d)),
    ]
    pairs = per_block * backbone.n_layers + [(torch.randn(n_targets, d), torch.randn(d, n_items + 1))]
    flops = sum(2.0 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1] for a, b in pairs)
    seconds = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        for a, b in pairs:
            torch.matmul(a, b)
        seconds.append(time.perf_counter() - t)
    return flops / statistics.median(seconds[1:])
