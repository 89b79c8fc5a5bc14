"""SASRec (Kang & McAuley, 2018) with pre-LN blocks, learned positions and tied item embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recpost.core.errors import RecpostError
from recpost.models.backbone import Backbone, BackboneConfig, compiled_encode
from recpost.models.dropout import Dropout


class _Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, ff_mult: int, activation: str = "gelu",
                 attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_dropout = attn_dropout
        if d_model % n_heads:
            raise RecpostError(f"model.backbone.d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, ff_mult * d_model), nn.ReLU() if activation == "relu" else nn.GELU(), Dropout(dropout),
            nn.Linear(ff_mult * d_model, d_model),
        )
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # Dropout on attention probabilities is off by default (attn_dropout 0): on CPU it materialises a
        # [B, h, L, L] Bernoulli mask and took 20% of a training step.
        p = self.attn_dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # [B, h, L, d/h]
        x = x + self.dropout(self.proj(att.transpose(1, 2).reshape(B, L, d)))
        return x + self.dropout(self.ff(self.ln2(x)))


class SASRec(Backbone):
    """Causal self-attention over the item sequence.

    Positions are counted from the right end (the newest item always has position ``max_len - 1``),
    so a history of any length sees the same position embedding for its last item in training and
    evaluation. Padding keys are masked; each position may always attend to itself, so fully padded
    rows stay finite (their outputs are never used).
    """

    def __init__(
        self, n_items: int, max_len: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 2,
        dropout: float = 0.2, ff_mult: int = 4, use_ratings: bool = False, activation: str = "gelu",
        similarity: str = "dot", temperature: float = 1.0, attn_dropout: float = 0.0,
    ) -> None:
        super().__init__(n_items, d_model, similarity, temperature)
        self.max_len = max_len
        self.d_model = d_model
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.rating_proj = nn.Linear(1, d_model) if use_ratings else None
        self.emb_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout, ff_mult, activation, attn_dropout) for _ in range(n_layers))
        self.final_ln = nn.LayerNorm(d_model)
        self.apply(self._init_weights)

    @classmethod
    def from_config(cls, cfg: BackboneConfig, n_items: int, max_len: int) -> SASRec:
        return cls(
            n_items=n_items, max_len=max_len, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            dropout=cfg.dropout, ff_mult=cfg.ff_mult, use_ratings=cfg.use_ratings, activation=cfg.activation,
            similarity=cfg.similarity, temperature=cfg.temperature, attn_dropout=cfg.attn_dropout,
        )

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def encode(
        self, items: torch.Tensor, ratings: torch.Tensor | None = None, timestamps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states ``[B, L, d]``; SASRec uses no timestamps (they are accepted and ignored)."""
        if self.run_compiled():
            return compiled_encode(self, items, ratings, timestamps)
        B, L = items.shape  # [B, L]
        if L > self.max_len:
            items, L = items[:, -self.max_len:], self.max_len
            ratings = ratings[:, -L:] if ratings is not None else None
        valid = items > 0  # [B, L]
        positions = torch.arange(self.max_len - L, self.max_len, device=items.device)
        x = self.item_emb(items) * math.sqrt(self.d_model) + self.pos_emb(positions)  # [B, L, d]
        if self.rating_proj is not None and ratings is not None:
            x = x + self.rating_proj(ratings.unsqueeze(-1).to(x.dtype))
        x = self.emb_dropout(x * valid.unsqueeze(-1))
        causal = torch.ones(L, L, dtype=torch.bool, device=items.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=items.device)
        allowed = (causal & valid[:, None, :]) | eye  # [B, L(query), L(key)]
        allowed = allowed.unsqueeze(1)  # [B, 1, L, L], broadcast over heads
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_ln(x)  # [B, L, d]
