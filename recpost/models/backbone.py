"""The backbone interface every method uses: encode a history, score items.

A backbone maps ``(item_ids [B, L], ratings [B, L] | None, timestamps [B, L] | None) -> hidden
[B, L, d]`` (left-padded with 0, causal: position t sees items <= t, their ratings and timestamps,
never anything later, so never the target's) and scores items against the item embedding table,
which is tied to the input embeddings: by dot product (recpost's default) or by cosine similarity
over a temperature (the published SASRec/HSTU recipe). Methods never touch the layers inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from recpost.core.errors import RecpostError
from recpost.models.fused_ce import linear_cross_entropy, weighted_linear_cross_entropy
from recpost.models.fused_policy import policy_catalog_terms

L2_NORM_EPS = 1e-6  # the reference HSTU code's l2_norm_eps


@dataclass
class BackboneConfig:
    """Architecture of the sequence encoder (shared by every method, so checkpoints transfer).

    Args:
        name: ``sasrec`` (pre-LN causal transformer, Kang & McAuley 2018) or ``hstu`` (pointwise
            SiLU attention with relative position and time biases, Zhai et al. 2024); see
            ``docs/backbones.md``.
        d_model: hidden and item embedding size.
        n_layers: blocks.
        n_heads: attention heads.
        dropout: dropout on embeddings and on each block's output (SASRec: also inside the FFN).
        attn_dropout: dropout on the attention weights (SASRec: on the softmax probabilities, as the original
            SASRec and RecBole; HSTU: on the pointwise attention weights, as the reference's
            ``attn_dropout_ratio``). Off by default: on CPU it materialises a ``[B, h, L, L]`` mask per layer.
        ff_mult: SASRec's feed-forward width as a multiple of ``d_model``.
        activation: SASRec's feed-forward activation (the original SASRec: ``relu``).
        attention_dim: HSTU's query/key size per head (``null``: ``d_model // n_heads``).
        linear_dim: HSTU's value/gate (U, V) size per head (``null``: ``d_model // n_heads``).
        time_bias: HSTU: add the relative attention bias of the (log-bucketed) time between events.
        time_buckets: HSTU: number of log-spaced time-gap buckets.
        similarity: ``dot`` (logits = hidden . item embedding) or ``cosine`` (both L2-normalised, over
            ``temperature``: the published SASRec/HSTU recipe with a sampled softmax).
        temperature: divides cosine logits (the published recipe: 0.05); ignored for ``dot``.
        use_ratings: add an embedding of each past item's rating to its input (the target's rating
            is never an input).
        compile: run ``encode`` through ``torch.compile`` (inductor, dynamic shapes). Measured on ML-100K
            (2 CPU cores, length-grouped batches, README "Compiled paths"): HSTU's training epoch ~20%
            faster after a one-off ~20 s of compiling, SASRec's ~2% (its attention is already one fused
            SDPA kernel). Same losses as eager without dropout; with dropout the random masks come
            from inductor's generator, so runs are reproducible but not bit-equal to eager ones.
    """

    name: Literal["sasrec", "hstu"] = "sasrec"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    attn_dropout: float = 0.0
    ff_mult: int = 4
    activation: Literal["gelu", "relu"] = "gelu"
    attention_dim: int | None = None
    linear_dim: int | None = None
    time_bias: bool = True
    time_buckets: int = 128
    similarity: Literal["dot", "cosine"] = "dot"
    temperature: float = 1.0
    use_ratings: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        for key in ("dropout", "attn_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise RecpostError(f"model.backbone.{key} must be in [0, 1) (a probability of zeroing), got {value}")


def _encode_eagerly(backbone: Backbone, items, ratings, timestamps) -> torch.Tensor:
    return type(backbone).encode(backbone, items, ratings, timestamps)


_COMPILED: dict[str, object] = {}


def compiled_encode(backbone: Backbone, items, ratings=None, timestamps=None) -> torch.Tensor:
    """``backbone.encode`` through one process-wide ``torch.compile`` of a function that takes the
    backbone as an argument: dynamo guards on which module it is, so a deep copy (the frozen reference)
    runs with its own weights, which a compiled bound method stored on the module would not do."""
    if "encode" not in _COMPILED:
        _COMPILED["encode"] = torch.compile(_encode_eagerly, dynamic=True)
    return _COMPILED["encode"](backbone, items, ratings, timestamps)


class Backbone(nn.Module, ABC):
    """Base class: item embeddings (0 = padding) and scoring; subclasses implement ``encode``."""

    def __init__(self, n_items: int, d_model: int, similarity: str = "dot", temperature: float = 1.0) -> None:
        super().__init__()
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, d_model, padding_idx=0)
        self.similarity = similarity
        self.temperature = temperature
        self.compile_encode = False  # BackboneConfig.compile, set by recpost.models.registry.build_backbone

    def run_compiled(self) -> bool:
        """Whether ``encode`` should hand over to :func:`compiled_encode` (not while being compiled)."""
        return self.compile_encode and not torch.compiler.is_compiling()

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: BackboneConfig, n_items: int, max_len: int) -> Backbone:
        """The backbone ``cfg`` describes (``cfg.name`` picks the class in ``recpost.models.registry``)."""

    @abstractmethod
    def encode(
        self, items: torch.Tensor, ratings: torch.Tensor | None = None, timestamps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states ``[B, L, d]`` for left-padded ``items [B, L]`` (and their ``ratings``, ``timestamps``)."""

    def item_weights(self) -> torch.Tensor:
        """Output embeddings ``[n_items + 1, d]`` (row 0 is padding and never recommended)."""
        return self.item_emb.weight

    def _scoring(self, hidden: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` and item ``weights`` as the similarity compares them (fp32; L2-normalised and the
        temperature folded into ``hidden`` for ``cosine``)."""
        hidden, weights = hidden.float(), weights.float()
        if self.similarity == "cosine":
            hidden = F.normalize(hidden, dim=-1, eps=L2_NORM_EPS) / self.temperature
            weights = F.normalize(weights, dim=-1, eps=L2_NORM_EPS)
        return hidden, weights

    def score(self, hidden: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Logits in fp32: over the whole catalog ``[..., n_items + 1]`` (padding at -inf), or for the
        given candidate ``items`` ``[..., K]`` (same leading shape as ``hidden`` minus d)."""
        if items is None:
            return self.score_columns(hidden, slice(None))
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden, weights = self._scoring(hidden, self.item_weights()[items])
            return (weights * hidden.unsqueeze(-2)).sum(-1)

    def cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Full-softmax next-item cross-entropy ``[N]`` (fp32) of ``hidden [N, d]`` at ``targets [N]``, as
        ``F.cross_entropy(self.score(hidden), targets)`` but a block of rows at a time (never the ``[N, V]``
        logits; :mod:`recpost.models.fused_ce`)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return linear_cross_entropy(*self.scoring_inputs(hidden), targets)

    def weighted_cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor,
                               coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum(coefficients * ce), ce [N])`` for :meth:`cross_entropy`'s ``ce`` and constant ``coefficients
        [N]`` (a mean, a weighted mean): the loss's gradients computed in the forward, one softmax pass per
        block (:class:`recpost.models.fused_ce.WeightedLinearCrossEntropy`); ``ce`` carries no gradient."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return weighted_linear_cross_entropy(*self.scoring_inputs(hidden), targets, coefficients)

    def scoring_inputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [..., d], weights [n_items + 1, d])`` in fp32 as the similarity compares them (logits =
        ``hidden @ weights.T``): the inputs of the block-at-a-time catalog functions. Call with autocast off."""
        return self._scoring(hidden, self.item_weights())

    def policy_terms(
        self, hidden: torch.Tensor, history: torch.Tensor | None, actions: torch.Tensor,
        ref_logp: torch.Tensor | None = None, with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PPO's catalog terms of the policy at ``hidden [N, d]`` (what the user had, ``history [N, K]``, masked):
        ``(log pi(actions) [N, k], KL(pi || ref) [N], entropy [N])``, fp32, a block of states at a time
        (:mod:`recpost.models.fused_policy`)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return policy_catalog_terms(*self.scoring_inputs(hidden), history, actions, ref_logp, with_entropy)

    def score_columns(self, hidden: torch.Tensor, columns: slice | torch.Tensor) -> torch.Tensor:
        """Logits in fp32 of the same items for every row, in one matmul: ``hidden [..., d]`` -> ``[..., K]``.

        ``columns`` is a slice of the catalog's ``n_items + 1`` columns (``slice(None)``: all of them;
        a chunk in chunked evaluation) or item ids ``[K]`` (negatives shared by a batch). The padding
        column (item 0) is -inf.
        """
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden, weights = self._scoring(hidden, self.item_weights()[columns])  # [..., d], [K, d]
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
