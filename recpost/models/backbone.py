"""The backbone interface every method uses: encode a history, score items.

A backbone maps ``(item_ids [B, L], ratings [B, L] | None) -> hidden [B, L, d]`` (left-padded with 0,
causal: position t sees items <= t) and scores items by the dot product with the item embedding
table, which is tied to the input embeddings. Methods never touch the layers inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class BackboneConfig:
    """Architecture of the sequence encoder (shared by every method, so checkpoints transfer).

    Args:
        name: ``sasrec`` (pre-LN causal transformer).
        d_model: hidden and item embedding size.
        n_layers: transformer blocks.
        n_heads: attention heads.
        dropout: dropout on embeddings, attention and feed-forward outputs.
        ff_mult: feed-forward width as a multiple of ``d_model``.
        use_ratings: add an embedding of each past item's rating to its input (the target's rating
            is never an input).
    """

    name: Literal["sasrec"] = "sasrec"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    ff_mult: int = 4
    use_ratings: bool = False


class Backbone(nn.Module, ABC):
    """Base class: item embeddings (0 = padding) and scoring; subclasses implement ``encode``."""

    def __init__(self, n_items: int, d_model: int) -> None:
        super().__init__()
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, d_model, padding_idx=0)

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: BackboneConfig, n_items: int, max_len: int) -> Backbone:
        """The backbone ``cfg`` describes (``cfg.name`` picks the class in ``recpost.models.registry``)."""

    @abstractmethod
    def encode(self, items: torch.Tensor, ratings: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, L, d]`` for left-padded ``items [B, L]`` (and their ``ratings``)."""

    def item_weights(self) -> torch.Tensor:
        """Output embeddings ``[n_items + 1, d]`` (row 0 is padding and never recommended)."""
        return self.item_emb.weight

    def score(self, hidden: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Logits in fp32: over the whole catalog ``[..., n_items + 1]`` (padding at -inf), or for the
        given candidate ``items`` ``[..., K]`` (same leading shape as ``hidden`` minus d)."""
        if items is None:
            return self.score_columns(hidden, slice(None))
        hidden = hidden.float()
        weights = self.item_weights().float()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return (weights[items] * hidden.unsqueeze(-2)).sum(-1)

    def score_columns(self, hidden: torch.Tensor, columns: slice | torch.Tensor) -> torch.Tensor:
        """Logits in fp32 of the same items for every row, in one matmul: ``hidden [..., d]`` -> ``[..., K]``.

        ``columns`` is a slice of the catalog's ``n_items + 1`` columns (``slice(None)``: all of them;
        a chunk in chunked evaluation) or item ids ``[K]`` (negatives shared by a batch). The padding
        column (item 0) is -inf.
        """
        hidden = hidden.float()
        weights = self.item_weights().float()[columns]  # [K, d]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            logits = hidden @ weights.T  # [..., K]
        return mask_padding_column(logits, columns)


def mask_padding_column(scores: torch.Tensor, columns: slice | torch.Tensor) -> torch.Tensor:
    """Set the padding item's column of ``scores [..., K]`` over catalog ``columns`` (a slice or item ids
    ``[K]``) to -inf: in place for a slice that starts at item 0, out of place for item ids."""
    if isinstance(columns, slice):
        if not columns.start:
            scores[..., 0] = float("-inf")
        return scores
    return scores.masked_fill(columns == 0, float("-inf"))
