"""The blockwise full-softmax cross-entropy equals F.cross_entropy on the materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recpost.models import BackboneConfig
from recpost.models import fused_ce
from recpost.models.fused_ce import block_rows, linear_cross_entropy
from recpost.models.registry import build_backbone


def _reference(hidden: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weights.T
    logits = logits.masked_fill(torch.arange(weights.shape[0]) == 0, float("-inf"))
    return F.cross_entropy(logits, targets, reduction="none")


def _values_and_grads(fn, hidden, weights, targets, upstream):
    h, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
    ce = fn(h, w, targets)
    (ce * upstream).sum().backward()
    return ce.detach(), h.grad, w.grad


@pytest.mark.parametrize("block_elements", [fused_ce.BLOCK_ELEMENTS, 37 * 64, 1])
def test_values_and_gradients_equal_the_materialised_cross_entropy(monkeypatch, block_elements):
    # one block, blocks that do not divide N (37 columns -> 64 rows per block for 150 rows), the minimum block
    monkeypatch.setattr(fused_ce, "BLOCK_ELEMENTS", block_elements)
    gen = torch.Generator().manual_seed(0)
    hidden, weights = torch.randn(150, 8, generator=gen), torch.randn(37, 8, generator=gen)
    targets = torch.randint(1, 37, (150,), generator=gen)
    upstream = torch.rand(150, generator=gen) * 3  # per-target weights, as ExpSFT's
    got = _values_and_grads(linear_cross_entropy, hidden, weights, targets, upstream)
    want = _values_and_grads(_reference, hidden, weights, targets, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert got[2][0].abs().max() == 0  # the padding row gets no gradient


def test_a_hand_computed_value_and_no_rows():
    hidden = torch.tensor([[1.0, 0.0]])
    weights = torch.tensor([[9.0, 9.0], [2.0, 0.0], [0.0, 1.0]])  # row 0 (padding) would dominate if counted
    ce = linear_cross_entropy(hidden, weights, torch.tensor([1]))
    assert ce.item() == pytest.approx(-2.0 + torch.logsumexp(torch.tensor([2.0, 0.0]), 0).item())
    assert linear_cross_entropy(torch.zeros(0, 2), weights, torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_block_rows_keep_a_block_near_the_cache_budget_within_bounds():
    assert block_rows(3616) == fused_ce.BLOCK_ELEMENTS // 3616
    assert block_rows(10) == fused_ce.MAX_ROWS
    assert block_rows(10**7) == fused_ce.MIN_ROWS


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_backbone_cross_entropy_equals_cross_entropy_of_its_scores(similarity):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(d_model=16, n_layers=1, similarity=similarity, temperature=0.05),
                              n_items=30, max_len=10)
    hidden = torch.randn(40, 16)
    targets = torch.randint(1, 31, (40,))
    got = backbone.cross_entropy(hidden, targets)
    got.sum().backward()
    grad = backbone.item_emb.weight.grad.clone()
    backbone.zero_grad()
    want = F.cross_entropy(backbone.score(hidden), targets, reduction="none")
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, backbone.item_emb.weight.grad, rtol=1e-4, atol=1e-5)


def test_backbone_cross_entropy_is_fp32_under_cpu_bf16_autocast():
    backbone = build_backbone(BackboneConfig(d_model=16, n_layers=1), n_items=30, max_len=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce = backbone.cross_entropy(torch.randn(5, 16).bfloat16(), torch.randint(1, 31, (5,)))
    assert ce.dtype == torch.float32 and torch.isfinite(ce).all()
