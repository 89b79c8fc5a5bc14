"""PPO's blockwise catalog terms equal the materialised log-softmax, gather, exact KL and entropy."""

from __future__ import annotations

import math

import pytest
import torch

from recpost.methods.policy import entropy, exact_kl, masked_log_probs
from recpost.models import BackboneConfig, fused_ce
from recpost.models.fused_policy import block_log_probs, history_index, policy_catalog_terms
from recpost.models.registry import build_backbone

N, V, D, K = 150, 37, 8, 3


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden, weights = torch.randn(N, D, generator=gen), torch.randn(V, D, generator=gen)
    history = torch.randint(0, V, (N, 6), generator=gen)  # 0 = nothing; repeated items are allowed
    history[:, 4:] = 0
    ref = masked_log_probs(torch.randn(N, V, generator=gen), history)
    # actions outside each state's history, as the rollout samples them
    actions = torch.multinomial(ref.exp(), K, replacement=True, generator=gen)
    upstream = [torch.randn(N, K, generator=gen), torch.rand(N, generator=gen), torch.randn(N, generator=gen)]
    return hidden, weights, history, actions, ref, upstream


def _materialised(hidden, weights, history, actions, ref, with_entropy):
    logp = masked_log_probs(hidden @ weights.T, history)
    kl = exact_kl(logp, ref) if ref is not None else torch.zeros(len(hidden))
    ent = entropy(logp) if with_entropy else torch.zeros(len(hidden))
    return logp.gather(1, actions), kl, ent


def _values_and_grads(fn, hidden, weights, history, actions, ref, with_entropy, upstream):
    h, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
    outs = fn(h, w, history, actions, ref, with_entropy)
    loss = sum((o * u).sum() for o, u in zip(outs, upstream) if o.requires_grad)
    loss.backward()
    return [o.detach() for o in outs] + [h.grad, w.grad]


@pytest.mark.parametrize("block_elements", [fused_ce.BLOCK_ELEMENTS, 37 * 64, 1])
@pytest.mark.parametrize("with_ref,with_entropy", [(True, False), (True, True), (False, True), (False, False)])
def test_values_and_gradients_equal_the_materialised_terms(monkeypatch, block_elements, with_ref, with_entropy):
    # one block; blocks that do not divide N (64 rows for 150); the minimum block size
    monkeypatch.setattr(fused_ce, "BLOCK_ELEMENTS", block_elements)
    hidden, weights, history, actions, ref, upstream = _inputs()
    ref = ref if with_ref else None
    got = _values_and_grads(policy_catalog_terms, hidden, weights, history, actions, ref, with_entropy, upstream)
    want = _values_and_grads(_materialised, hidden, weights, history, actions, ref, with_entropy, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert got[4][0].abs().max() == 0  # the padding item takes no gradient
    assert all(torch.isfinite(t).all() for t in got)


def test_without_history_only_padding_is_masked():
    hidden, weights, _, actions, _, _ = _inputs()
    logp_a, _, ent = policy_catalog_terms(hidden, weights, None, actions, None, True)
    want = masked_log_probs(hidden @ weights.T, None)
    torch.testing.assert_close(logp_a, want.gather(1, actions))
    torch.testing.assert_close(ent, entropy(want))


def test_a_hand_computed_state():
    hidden = torch.tensor([[1.0]])
    weights = torch.tensor([[5.0], [math.log(1.0)], [math.log(3.0)], [2.0]])  # padding, items 1-3
    history = torch.tensor([[3, 0]])  # item 3 was had: p over items 1, 2 is (1/4, 3/4)
    ref = torch.log(torch.tensor([[0.0, 0.5, 0.5, 0.0]]))
    logp_a, kl, ent = policy_catalog_terms(hidden, weights, history, torch.tensor([[2, 1]]), ref, True)
    assert logp_a.tolist()[0] == pytest.approx([math.log(0.75), math.log(0.25)])
    assert kl.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_backbone_policy_terms_equal_the_terms_of_its_scores(similarity):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(d_model=D, n_layers=1, similarity=similarity, temperature=0.05),
                              n_items=V - 1, max_len=10)
    hidden, _, history, actions, ref, upstream = _inputs(1)
    got = backbone.policy_terms(hidden, history, actions, ref, True)
    sum((o * u).sum() for o, u in zip(got, upstream)).backward()
    grad = backbone.item_emb.weight.grad.clone()
    backbone.zero_grad()
    logp = masked_log_probs(backbone.score(hidden), history)
    want = (logp.gather(1, actions), exact_kl(logp, ref), entropy(logp))
    sum((o * u).sum() for o, u in zip(want, upstream)).backward()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # float32 summed in another order: cosine scores divided by a temperature of 0.05 magnify the rounding
    # (one element of 296 differed by 1.8e-4 on a CI machine); a wrong term would differ by the gradient's size
    torch.testing.assert_close(grad, backbone.item_emb.weight.grad, rtol=1e-3, atol=1e-3)


def test_block_log_probs_are_the_masked_log_softmax_and_fp32_under_bf16_autocast():
    hidden, weights, history, actions, _, _ = _inputs()
    logp, lse = block_log_probs(hidden, weights, history_index(history, V))
    torch.testing.assert_close(logp, masked_log_probs(hidden @ weights.T, history))
    backbone = build_backbone(BackboneConfig(d_model=D, n_layers=1), n_items=V - 1, max_len=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = backbone.policy_terms(hidden.bfloat16(), history, actions, None, True)
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outs)
