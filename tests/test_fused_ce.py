"""The blockwise full-softmax cross-entropy equals F.cross_entropy on the materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recpost.models import BackboneConfig
from recpost.models import fused_ce
from recpost.models.fused_ce import block_rows, linear_cross_entropy, weighted_linear_cross_entropy
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


def _weighted_values_and_grads(hidden, weights, targets, coefficients, scale=1.0):
    h, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
    loss, ce = weighted_linear_cross_entropy(h, w, targets, coefficients)
    (loss * scale).backward()
    return loss.detach(), ce, h.grad, w.grad


@pytest.mark.parametrize("block_elements", [fused_ce.BLOCK_ELEMENTS, 37 * 64, 1])
def test_the_weighted_loss_and_its_forward_computed_gradients_equal_autograd_through_the_materialised_logits(
        monkeypatch, block_elements):
    monkeypatch.setattr(fused_ce, "BLOCK_ELEMENTS", block_elements)
    gen = torch.Generator().manual_seed(1)
    hidden, weights = torch.randn(150, 8, generator=gen), torch.randn(37, 8, generator=gen)
    targets = torch.randint(1, 37, (150,), generator=gen)
    coefficients = torch.rand(150, generator=gen) * 3 / 150  # ExpSFT's weights over N
    # the backward scales the forward's gradients by the upstream gradient (here 2.5, as a loss scale would)
    loss, ce, grad_h, grad_w = _weighted_values_and_grads(hidden, weights, targets, coefficients, scale=2.5)
    ref_ce, ref_h, ref_w = _values_and_grads(_reference, hidden, weights, targets, coefficients * 2.5)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, (coefficients * ref_ce).sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-6)
    assert grad_w[0].abs().max() == 0 and not ce.requires_grad  # padding gets no gradient; ce carries none


def test_the_weighted_loss_of_a_hand_computed_row_and_its_coefficients_are_constants():
    hidden = torch.tensor([[1.0, 0.0]], requires_grad=True)
    weights = torch.tensor([[9.0, 9.0], [2.0, 0.0], [0.0, 1.0]])
    coefficients = torch.tensor([0.5], requires_grad=True)  # detached: no gradient flows into them
    loss, ce = weighted_linear_cross_entropy(hidden, weights, torch.tensor([1]), coefficients)
    want = -2.0 + torch.logsumexp(torch.tensor([2.0, 0.0]), 0).item()
    assert ce.item() == pytest.approx(want) and loss.item() == pytest.approx(0.5 * want)
    loss.backward()
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)  # d ce / d hidden = sum_v p_v w_v - w_target
    torch.testing.assert_close(hidden.grad, 0.5 * (p[0] * weights[1] + p[1] * weights[2] - weights[1])[None])
    assert coefficients.grad is None
    # without gradients wanted, nothing is computed for them, and the values are the same
    loss2, ce2 = weighted_linear_cross_entropy(hidden.detach(), weights, torch.tensor([1]), coefficients)
    assert loss2.item() == loss.item() and not loss2.requires_grad


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_backbone_weighted_cross_entropy_equals_the_weighted_sum_of_its_cross_entropy(similarity):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(d_model=16, n_layers=1, similarity=similarity, temperature=0.05),
                              n_items=30, max_len=10)
    hidden = torch.randn(40, 16, requires_grad=True)
    targets, coefficients = torch.randint(1, 31, (40,)), torch.rand(40) / 40
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 inside, as cross_entropy
        loss, ce = backbone.weighted_cross_entropy(hidden, targets, coefficients)
    loss.backward()
    grads = hidden.grad.clone(), backbone.item_emb.weight.grad.clone()
    hidden.grad = None
    backbone.zero_grad()
    want = backbone.cross_entropy(hidden, targets)
    (coefficients * want).sum().backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(ce, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], backbone.item_emb.weight.grad, rtol=1e-4, atol=1e-6)
