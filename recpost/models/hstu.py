"""HSTU (Zhai et al., 2024, "Actions Speak Louder than Words", ICML): the generative recommender the
research post-trains. Per block, as in the paper and its reference code (meta-recsys/generative-
recommenders, ``research/modeling/sequential/hstu.py``)::

    U, V, Q, K = split(SiLU(LN(x) W_uvqk))                      one projection, no bias
    A = SiLU(Q K^T + rab_position + rab_time) / max_len * mask  pointwise attention, no softmax
    y = x + W_o dropout(U * LN(A V))                             gated, residual

``rab_position`` is a learned bias per relative position ``i - j``; ``rab_time`` a learned bias per
log-bucketed time gap ``ts_i - ts_j`` (seconds). ``mask`` is causal and drops padding keys. Where
recpost differs from the reference code, and why (``docs/backbones.md``):

- the time gap of query ``i`` is measured from its *own* event (``ts_i - ts_j``), not from the next
  event's (``ts_{i+1} - ts_j``): the next event is the target, and its timestamp is never an input;
- histories are left-padded (newest item last, as for SASRec) and padding keys are masked, so a
  history's outputs do not depend on how much padding its batch has; the attention is scaled by the
  constant ``max_len``, as the reference's is by its constant padded length;
- the output passes a final LayerNorm (with ``similarity: cosine`` it is L2-normalised for scoring,
  the reference's ``l2_norm``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recpost.core.errors import RecpostError
from recpost.models.backbone import Backbone, BackboneConfig, compiled_encode
from recpost.models.dropout import Dropout

LN_EPS = 1e-6  # the reference's LayerNorm epsilon inside a block
TIME_BUCKET_DIVISOR = 0.301  # the reference's bucket = floor(ln(max(|dt|, 1)) / 0.301)


def time_buckets(timestamps: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Bucket of the time gap between every query ``i`` and key ``j``: ``[B, L] -> [B, L, L]`` long,
    ``floor(ln(max(|ts_i - ts_j|, 1)) / 0.301)`` clamped to ``[0, n_buckets]`` (log-spaced: one
    bucket per factor of ~1.35 in seconds)."""
    gap = (timestamps[:, :, None] - timestamps[:, None, :]).abs().clamp(min=1).double()  # [B, L, L]
    return (gap.log() / TIME_BUCKET_DIVISOR).long().clamp(0, n_buckets)


class RelativeBias(nn.Module):
    """``rab [B, L, L]``: a learned bias per relative position ``i - j`` (< ``max_len``) plus, with
    ``time_buckets``, one per time-gap bucket; one module per block, as in the reference."""

    def __init__(self, max_len: int, time_buckets: int | None) -> None:
        super().__init__()
        self.max_len = max_len
        self.position = nn.Parameter(torch.empty(2 * max_len - 1).normal_(std=0.02))
        self.time = nn.Parameter(torch.empty(time_buckets + 1).normal_(std=0.02)) if time_buckets else None

    def forward(self, relative_position: torch.Tensor, buckets: torch.Tensor | None) -> torch.Tensor:
        bias = self.position[relative_position + self.max_len - 1]  # [L, L]
        if self.time is None or buckets is None:
            return bias.unsqueeze(0)  # [1, L, L]
        return bias + self.time[buckets]  # [B, L, L]


class HSTUBlock(nn.Module):
    """One sequential transduction unit (see the module docstring)."""

    def __init__(self, d_model: int, n_heads: int, attention_dim: int, linear_dim: int, dropout: float,
                 max_len: int, time_buckets: int | None, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.attention_dim, self.linear_dim, self.max_len = n_heads, attention_dim, linear_dim, max_len
        self.uvqk = nn.Parameter(torch.empty(d_model, (2 * linear_dim + 2 * attention_dim) * n_heads).normal_(std=0.02))
        self.out = nn.Linear(linear_dim * n_heads, d_model)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.dropout = Dropout(dropout)
        self.attn_dropout = Dropout(attn_dropout) if attn_dropout > 0 else nn.Identity()
        self.bias = RelativeBias(max_len, time_buckets)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, relative_position: torch.Tensor,
                buckets: torch.Tensor | None) -> torch.Tensor:
        B, L, d = x.shape
        h, dqk, dv = self.n_heads, self.attention_dim, self.linear_dim
        uvqk = F.silu(F.layer_norm(x, (d,), eps=LN_EPS) @ self.uvqk)  # [B, L, (2 dv + 2 dqk) h]
        u, v, q, k = uvqk.split([dv * h, dv * h, dqk * h, dqk * h], dim=-1)
        scores = torch.einsum("bnhd,bmhd->bhnm", q.view(B, L, h, dqk), k.view(B, L, h, dqk))  # [B, h, L, L]
        scores = scores + self.bias(relative_position, buckets).unsqueeze(1)
        attention = self.attn_dropout(F.silu(scores) / self.max_len * allowed.unsqueeze(1))  # [B, h, L, L]
        values = torch.einsum("bhnm,bmhd->bnhd", attention, v.view(B, L, h, dv)).reshape(B, L, h * dv)
        gated = u * F.layer_norm(values, (h * dv,), eps=LN_EPS)  # [B, L, h dv]
        return x + self.out(self.dropout(gated))


class HSTU(Backbone):
    """Stacked HSTU blocks over item embeddings (plus learned positions counted from the newest item).

    ``timestamps [B, L]`` (seconds, or any order key; 0 at padding) feed the time bias; without them,
    or with ``time_bias: false``, only the relative position bias is used.
    """

    def __init__(
        self, n_items: int, max_len: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 2,
        attention_dim: int | None = None, linear_dim: int | None = None, dropout: float = 0.2,
        time_bias: bool = True, time_buckets: int = 128, use_ratings: bool = False, similarity: str = "dot",
        temperature: float = 1.0, attn_dropout: float = 0.0,
    ) -> None:
        super().__init__(n_items, d_model, similarity, temperature)
        attention_dim = attention_dim or d_model // n_heads
        linear_dim = linear_dim or d_model // n_heads
        if attention_dim < 1 or linear_dim < 1:
            raise RecpostError(f"model.backbone: HSTU needs attention_dim and linear_dim >= 1 (d_model {d_model}, "
                               f"n_heads {n_heads}); set them or lower n_heads")
        self.max_len, self.d_model, self.time_bias = max_len, d_model, time_bias
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.rating_proj = nn.Linear(1, d_model) if use_ratings else None
        self.emb_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            HSTUBlock(d_model, n_heads, attention_dim, linear_dim, dropout, max_len, time_buckets if time_bias else None,
                      attn_dropout)
            for _ in range(n_layers)
        )
        self.final_ln = nn.LayerNorm(d_model)
        # The reference's embedding initialisation: truncated normal with std sqrt(1 / d).
        std = math.sqrt(1.0 / d_model)
        for table in (self.item_emb, self.pos_emb):
            nn.init.trunc_normal_(table.weight, std=std, a=-2 * std, b=2 * std)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @classmethod
    def from_config(cls, cfg: BackboneConfig, n_items: int, max_len: int) -> HSTU:
        return cls(
            n_items=n_items, max_len=max_len, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            attention_dim=cfg.attention_dim, linear_dim=cfg.linear_dim, dropout=cfg.dropout, time_bias=cfg.time_bias,
            time_buckets=cfg.time_buckets, use_ratings=cfg.use_ratings, similarity=cfg.similarity,
            temperature=cfg.temperature, attn_dropout=cfg.attn_dropout,
        )

    def encode(
        self, items: torch.Tensor, ratings: torch.Tensor | None = None, timestamps: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.run_compiled():
            return compiled_encode(self, items, ratings, timestamps)
        B, L = items.shape  # [B, L]
        if L > self.max_len:
            items, L = items[:, -self.max_len:], self.max_len
            ratings = ratings[:, -L:] if ratings is not None else None
            timestamps = timestamps[:, -L:] if timestamps is not None else None
        valid = items > 0  # [B, L]
        positions = torch.arange(self.max_len - L, self.max_len, device=items.device)
        x = self.item_emb(items) * math.sqrt(self.d_model) + self.pos_emb(positions)  # [B, L, d]
        if self.rating_proj is not None and ratings is not None:
            x = x + self.rating_proj(ratings.unsqueeze(-1).to(x.dtype))
        x = self.emb_dropout(x) * valid.unsqueeze(-1)
        index = torch.arange(L, device=items.device)
        relative_position = index[:, None] - index[None, :]  # [L, L], i - j
        allowed = (relative_position >= 0) & valid[:, None, :]  # [B, L(query), L(key)]: causal, no padding keys
        buckets = None
        if self.time_bias and timestamps is not None:
            buckets = time_buckets(timestamps.long(), self.blocks[0].bias.time.shape[0] - 1)  # [B, L, L]
        for block in self.blocks:
            x = block(x, allowed.to(x.dtype), relative_position, buckets)
        return self.final_ln(x)  # [B, L, d]
