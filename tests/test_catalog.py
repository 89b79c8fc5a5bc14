"""A policy over the catalog a chunk at a time: the same normaliser, gradients, samples and entropy as the
whole-catalog computation, without ever holding ``[states, items]`` tensors."""

from __future__ import annotations

import pytest
import torch

from recpost.methods import DPO, PPO
from recpost.methods.catalog import MASKED, catalog_entropy, catalog_logsumexp, chunks, masked_chunk, sample_from_catalog
from recpost.methods.policy import entropy, masked_log_probs
from recpost.models import BackboneConfig, build_backbone
from tests.helpers import build

V1 = 23  # columns: padding + 22 items


@pytest.fixture
def setup():
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(d_model=8, n_layers=1, n_heads=2, dropout=0.0), n_items=V1 - 1, max_len=6)
    hidden = torch.randn(5, 8, requires_grad=True)
    history = torch.tensor([[3, 4, 0], [0, 0, 0], [1, 2, 22], [5, 0, 0], [7, 8, 9]])  # items each state had
    return backbone, hidden, history


def _full(backbone, hidden, history):
    return masked_log_probs(backbone.score_columns(hidden, slice(None)), history)  # [N, V1]


@pytest.mark.parametrize("chunk", [4, 7, V1])
def test_the_chunked_log_normaliser_and_its_gradient_equal_the_whole_catalogs(setup, chunk):
    backbone, hidden, history = setup
    lse = catalog_logsumexp(backbone.score_columns, hidden, history, V1, chunk)
    logits = backbone.score_columns(hidden, slice(None))
    expected = logits.scatter(1, history, float("-inf")).logsumexp(dim=1)
    assert torch.allclose(lse, expected, atol=1e-5)
    weights = torch.randn(5)
    (grad_chunked,) = torch.autograd.grad((lse * weights).sum(), hidden)
    (grad_full,) = torch.autograd.grad((expected * weights).sum(), hidden)
    assert torch.allclose(grad_chunked, grad_full, atol=1e-5)
    assert torch.isfinite(grad_chunked).all()


@pytest.mark.parametrize("chunk", [4, 7, V1])
def test_each_chunk_masks_exactly_padding_and_the_items_each_state_had(setup, chunk):
    _, _, history = setup
    dense = torch.zeros(5, V1, dtype=torch.bool)  # built item by item
    for row, items in enumerate(history.tolist()):
        dense[row, [0, *items]] = True
    logits = torch.randn(5, V1)
    for columns in chunks(V1, chunk):
        got = masked_chunk(logits[:, columns], columns, history)
        want = logits[:, columns].masked_fill(dense[:, columns], MASKED)
        assert torch.equal(got, want)


def test_a_chunk_where_every_item_is_masked_keeps_finite_gradients(setup):
    backbone, hidden, _ = setup
    history = torch.tensor([[1, 2, 3]] * 5)  # with chunk 4, columns 0..3 are all masked
    lse = catalog_logsumexp(backbone.score_columns, hidden, history, V1, 4)
    (grad,) = torch.autograd.grad(lse.sum(), hidden)
    assert torch.isfinite(grad).all() and lse.min() > MASKED / 2


@pytest.mark.parametrize("replacement", [True, False])
def test_chunked_samples_follow_the_masked_softmax_and_never_a_masked_item(setup, replacement):
    backbone, hidden, history = setup
    hidden = hidden.detach()
    torch.manual_seed(1)
    draws = torch.cat([sample_from_catalog(backbone.score_columns, hidden, history, V1, 5, k=2, replacement=replacement)
                       for _ in range(2000)], dim=1)  # [5, 4000]
    assert not (draws[:, :, None] == history[:, None, :]).any() and (draws > 0).all()
    probs = _full(backbone, hidden, history).exp()  # [5, V1]
    if replacement:  # every draw is i.i.d. from the masked softmax
        freq = torch.stack([torch.bincount(row, minlength=V1) for row in draws]).float() / draws.shape[1]
        assert torch.allclose(freq, probs, atol=0.03)
    else:  # two distinct items; the first of the pair (Gumbel top-1) follows the masked softmax
        pairs = draws.view(5, -1, 2)
        assert (pairs[:, :, 0] != pairs[:, :, 1]).all()
        first = torch.stack([torch.bincount(row, minlength=V1) for row in pairs[:, :, 0]]).float() / pairs.shape[1]
        assert torch.allclose(first, probs, atol=0.04)


def test_the_chunked_entropy_equals_the_whole_catalogs(setup):
    backbone, hidden, history = setup
    hidden = hidden.detach()
    lse = catalog_logsumexp(backbone.score_columns, hidden, history, V1, 6)
    assert torch.allclose(catalog_entropy(backbone.score_columns, hidden, history, V1, 6, lse),
                          entropy(_full(backbone, hidden, history)), atol=1e-4)


def test_chunked_dpo_gives_the_whole_catalog_loss(rlhf_setup):
    dm, pre, rm = rlhf_setup
    batch = dm.train_batch(list(range(32)))
    losses = []
    for chunk in (None, 7):  # logged pairs: the same pairs, so the same loss to float tolerance
        dpo = build(DPO, dm, init_from=str(pre), reward_model=str(rm), pair_source="logged", score_chunk_size=chunk)
        with torch.no_grad():
            dpo.backbone.item_emb.weight.mul_(1.5)  # policy != reference
        torch.manual_seed(0)
        losses.append(dpo.training_loss(batch)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_chunked_ppo_trains_with_a_sampled_kl_and_refuses_the_exact_one(rlhf_setup):
    from recpost.core.errors import RecpostError

    dm, pre, rm = rlhf_setup
    with pytest.raises(RecpostError, match="kl_estimator: exact sums over the whole catalog"):
        build(PPO, dm, init_from=str(pre), reward_model=str(rm), score_chunk_size=7)
    ppo = build(PPO, dm, init_from=str(pre), reward_model=str(rm), score_chunk_size=7, kl_estimator="k3", k=4)
    batch = dm.train_batch(list(range(32)))
    roll = ppo.rollout(batch)
    assert roll.ref_logp is None and torch.isfinite(roll.advantages).all()
    loss, stats, ratio = ppo.minibatch_loss(batch, roll, None)
    assert torch.isfinite(loss) and torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)  # first update: ratio 1
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ppo.parameters() if p.grad is not None)
