"""The reward model as a component: a backbone and a rating head that predict the rating a user would
give an item after their history.

``RatingModel`` is a plain ``nn.Module``. ``recpost.methods.RewardModel`` (a LightningModule) trains
one; PPO, DPO and any method's ``eval_reward_model`` hold one frozen, loaded by
``recpost.models.checkpoint.load_reward_model``. Its ``state_dict`` keys (``backbone.*``, ``head.*``) are the
trained RewardModel's, so a RewardModel checkpoint loads into it directly.

The head starts as the classic damped *baseline predictor* (Koren, 2008) and learns the rest from the
backbone's state::

    r(s_t, i) = b + b_i + a * m_t + v . h_t + (W_h h_t + W_g g_t) . e_i

- ``b``: global mean rating, ``b_i``: item bias, both set from the training ratings at the start of
  fit (item deviations shrunk by ``prior_count``);
- ``m_t``: the user's mean deviation ``r - b - b_i`` over the items of the history up to ``t``, shrunk
  by ``prior_count``; ``a`` starts at 1, so the untrained head *is* the baseline predictor;
- ``h_t``: the backbone's hidden state, ``e_i``: its item embeddings;
- ``g_t``: the history's items weighted by those deviations (what the user liked and disliked), shrunk
  the same way; ``v``, ``W_h``, ``W_g`` start at 0.

Scoring the whole catalog is one ``[B, d] @ [d, V + 1]`` matmul; scoring given candidates costs only
those. Predictions are in fp32 whatever the autocast, on the source's rating scale (stars).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from recpost.models.backbone import Backbone, mask_padding_column


class RatingHead(nn.Module):
    """``r(s_t, i)`` of the module docstring; ``prior_count`` shrinks item and user deviations."""

    def __init__(self, n_items: int, d_model: int, prior_count: float) -> None:
        super().__init__()
        self.prior_count = prior_count
        self.bias = nn.Parameter(torch.zeros(()))
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1))
        self.user_weight = nn.Parameter(torch.ones(()))
        self.state_bias = nn.Linear(d_model, 1, bias=False)
        self.query_state = nn.Linear(d_model, d_model, bias=False)
        self.query_taste = nn.Linear(d_model, d_model, bias=False)
        for layer in (self.state_bias, self.query_state, self.query_taste):
            nn.init.zeros_(layer.weight)
        # Set once from the training data at the start of the first fit (then saved in checkpoints).
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def init_biases(self, global_mean: float, item_sum: torch.Tensor, item_count: torch.Tensor) -> None:
        """``b`` = training mean, ``b_i`` = shrunk mean deviation of the item's training ratings
        (``item_sum``, ``item_count`` ``[n_items + 1]``)."""
        self.bias.fill_(global_mean)
        dev = (item_sum - item_count * global_mean) / (item_count + self.prior_count)
        self.item_bias.copy_(dev.to(self.item_bias))
        self.item_bias[0] = 0.0
        self.initialized.fill_(True)

    def state(self, hidden: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, item_emb: torch.Tensor):
        """Per-position state terms: ``offset [B, L]`` (``b + a m_t + v.h_t``) and ``query [B, L, d]``."""
        valid = (items > 0).float()  # [B, L]
        # Deviation of each past rating from what b + b_i predicts; no gradient into the biases from here.
        dev = (ratings.float() - self.bias.detach() - self.item_bias.detach()[items]) * valid  # [B, L]
        denom = valid.cumsum(1) + self.prior_count  # [B, L]
        user_dev = dev.cumsum(1) / denom  # m_t
        taste = (dev.unsqueeze(-1) * item_emb[items]).cumsum(1) / denom.unsqueeze(-1)  # g_t [B, L, d]
        offset = self.bias + self.user_weight * user_dev + self.state_bias(hidden).squeeze(-1)
        query = self.query_state(hidden) + self.query_taste(taste)
        return offset, query

    def forward(self, offset: torch.Tensor, query: torch.Tensor, item_emb: torch.Tensor, items: torch.Tensor | None = None):
        """Predicted ratings: for ``items [..., K]`` -> ``[..., K]``, else the catalog ``[..., V + 1]``."""
        if items is not None:
            return offset.unsqueeze(-1) + self.item_bias[items] + (item_emb[items] * query.unsqueeze(-2)).sum(-1)
        return self.score_columns(offset, query, item_emb, slice(None))

    def score_columns(
        self, offset: torch.Tensor, query: torch.Tensor, item_emb: torch.Tensor, columns: slice | torch.Tensor
    ) -> torch.Tensor:
        """Predicted ratings of the same items for every row in one matmul: ``columns`` is a slice of the
        catalog's ``V + 1`` columns or item ids ``[K]`` -> ``[..., K]`` (padding is not masked here)."""
        return offset.unsqueeze(-1) + self.item_bias[columns] + query @ item_emb[columns].T


class RatingModel(nn.Module):
    """Backbone + rating head: the predicted rating of items after a history (see the module docstring).

    Args:
        backbone: encodes the history (its item embeddings are the ``e_i`` of the head).
        head: the rating head.
    """

    def __init__(self, backbone: Backbone, head: RatingHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def n_items(self) -> int:
        return self.backbone.n_items

    def states(
        self, items: torch.Tensor, ratings: torch.Tensor, timestamps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(offset [B, L], query [B, L, d], item_emb [V + 1, d])`` in fp32 for histories ``items [B, L]``
        with their ``ratings [B, L]`` (and ``timestamps``): what the head needs to score any item anywhere."""
        hidden = self.backbone.encode(items, ratings, timestamps).float()  # [B, L, d]
        item_emb = self.backbone.item_weights().float()  # [V + 1, d]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            offset, query = self.head.state(hidden, items, ratings, item_emb)
        return offset, query, item_emb

    def predict_rewards(
        self, input_items: torch.Tensor, input_ratings: torch.Tensor, candidates: torch.Tensor | None = None,
        input_timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted ratings after each whole history ``input_items [B, L]``: of every item ``[B, n_items + 1]``
        (column 0 is padding: meaningless), or of ``candidates [B, K]`` -> ``[B, K]``."""
        offset, query, item_emb = self.states(input_items, input_ratings, input_timestamps)
        with torch.autocast(device_type=offset.device.type, enabled=False):
            return self.head(offset[:, -1], query[:, -1], item_emb, candidates)

    def column_scorer(
        self, input_items: torch.Tensor, input_ratings: torch.Tensor, input_timestamps: torch.Tensor | None = None,
    ) -> Callable[[slice | torch.Tensor], torch.Tensor]:
        """Encode each history once; returns ``columns -> [B, K]`` predicted ratings of those catalog columns
        (a slice, or item ids ``[K]``) after the whole history, the padding column -inf: what ranking the
        catalog a chunk at a time needs."""
        offset, query, item_emb = self.states(input_items, input_ratings, input_timestamps)
        offset, query = offset[:, -1], query[:, -1]  # [B], [B, d]

        def score(columns: slice | torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=offset.device.type, enabled=False):
                return mask_padding_column(self.head.score_columns(offset, query, item_emb, columns), columns)

        return score

    def rewards_at(
        self, input_items: torch.Tensor, input_ratings: torch.Tensor, states: torch.Tensor,
        candidates: torch.Tensor | None = None, input_timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted ratings at the ``states [B, L]`` (bool) positions: of ``candidates [N, K]`` -> ``[N, K]``
        (only those items are scored), or of every item -> ``[N, n_items + 1]``."""
        offset, query, item_emb = self.states(input_items, input_ratings, input_timestamps)
        with torch.autocast(device_type=offset.device.type, enabled=False):
            return self.head(offset[states], query[states], item_emb, candidates)
