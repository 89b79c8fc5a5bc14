"""SASRec backbone: causality, padding, scoring."""

import torch

from recpost.models import BackboneConfig, SASRec, build_backbone


def _model(**kw) -> SASRec:
    torch.manual_seed(0)
    m = SASRec(n_items=30, max_len=8, d_model=16, n_layers=2, n_heads=2, dropout=0.0, **kw)
    return m.eval()


def test_position_sees_no_future_item():
    m = _model()
    items = torch.tensor([[3, 4, 5, 6, 7]])
    changed = items.clone()
    changed[0, 3:] = torch.tensor([20, 21])
    h1, h2 = m.encode(items), m.encode(changed)
    assert torch.allclose(h1[:, :3], h2[:, :3], atol=1e-6)
    assert not torch.allclose(h1[:, 3:], h2[:, 3:])


def test_left_padding_does_not_change_the_last_hidden_state():
    m = _model()
    short = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[0, 0, 0, 3, 4, 5]])
    assert torch.allclose(m.encode(short)[:, -1], m.encode(padded)[:, -1], atol=1e-5)


def test_fully_padded_rows_stay_finite():
    m = _model()
    assert torch.isfinite(m.encode(torch.zeros(2, 5, dtype=torch.long))).all()


def test_history_longer_than_max_len_keeps_the_newest_items():
    m = _model()
    long = torch.arange(1, 13)[None]  # 12 items, max_len 8
    assert torch.allclose(m.encode(long)[:, -1], m.encode(long[:, -8:])[:, -1], atol=1e-6)


def test_scores_cover_the_catalog_with_padding_at_minus_inf():
    m = _model()
    h = m.encode(torch.tensor([[1, 2, 3]]))[:, -1]
    scores = m.score(h)
    assert scores.shape == (1, 31) and scores.dtype == torch.float32
    assert scores[0, 0] == float("-inf") and torch.isfinite(scores[0, 1:]).all()
    cand = m.score(h, torch.tensor([[5, 9]]))
    assert torch.allclose(cand, scores[:, [5, 9]], atol=1e-5)


def test_past_ratings_change_the_encoding_only_when_enabled():
    items = torch.tensor([[3, 4, 5]])
    lo, hi = torch.ones(1, 3), torch.full((1, 3), 5.0)
    plain, rated = _model(), _model(use_ratings=True)
    assert torch.equal(plain.encode(items, lo), plain.encode(items, hi))
    assert not torch.allclose(rated.encode(items, lo), rated.encode(items, hi))


def test_build_backbone_from_config():
    m = build_backbone(BackboneConfig(d_model=32, n_layers=1, n_heads=4), n_items=10, max_len=6)
    assert isinstance(m, SASRec) and m.item_emb.weight.shape == (11, 32)
