"""Ranking metrics over the full catalog, exact under DDP.

Ties are broken pessimistically: the target's rank counts every other item scoring at least as high,
so a model that scores all items equally ranks every target last, not first.

Lightning's distributed sampler pads the last evaluation shard with repeated users. The metric keeps
one row per evaluated user (``cat`` states, gathered once in ``compute``) and drops repeated user
indices before averaging, so 2 ranks give exactly the numbers of 1. Coverage is a union, which
repeats cannot change.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def mask_items(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Set ``scores[b, items[b, j]] = -inf`` in place (item 0, padding, is always masked)."""
    scores.scatter_(1, items, float("-inf"))
    scores[:, 0] = float("-inf")
    return scores


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items, counting ties against it. ``[B, V], [B] -> [B]``."""
    target_score = scores.gather(1, target[:, None])  # [B, 1]
    return (scores >= target_score).sum(1) - 1


class RankingMetrics(Metric):
    """NDCG@K, HR@K, MRR, liked-target variants, rating@10 and coverage@10.

    Args:
        n_items: catalog size (coverage denominator).
        ks: cut-offs for ``ndcg@K`` and ``hr@K``.
        extra: names of additional per-user values (e.g. ``true_reward@10``) averaged the same way.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, n_items: int, ks: tuple[int, ...] = (10, 50), extra: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.n_items = n_items
        self.ks = ks
        self.extra = extra
        for name in ("user_index", "rank", "target_rating", "liked", *self._extra_states()):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("covered", default=torch.zeros(n_items + 1), dist_reduce_fx="max")

    def _extra_states(self) -> list[str]:
        return [f"extra_{i}" for i in range(len(self.extra))]

    def update(
        self,
        scores: torch.Tensor,  # [B, n_items + 1], already masked
        target_item: torch.Tensor,  # [B]
        target_rating: torch.Tensor,  # [B]
        target_liked: torch.Tensor,  # [B] bool
        user_index: torch.Tensor,  # [B]
        extra: dict[str, torch.Tensor] | None = None,  # name -> [B]
    ) -> None:
        scores = scores.float()
        self.user_index.append(user_index.long())
        self.rank.append(target_ranks(scores, target_item))
        self.target_rating.append(target_rating.float())
        self.liked.append(target_liked.bool())
        top = scores.topk(min(10, scores.shape[1]), dim=1).indices  # [B, 10]
        self.covered[top.flatten()] = 1.0
        for name, state in zip(self.extra, self._extra_states()):
            getattr(self, state).append(extra[name].float())

    def per_user(self) -> dict[str, torch.Tensor]:
        """One row per distinct user (sorted by user index): rank, rating, liked, extras."""
        users = dim_zero_cat(self.user_index)
        uniq, inverse = torch.unique(users, sorted=True, return_inverse=True)
        first = torch.full((len(uniq),), len(users), dtype=torch.long, device=users.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(users), device=users.device), reduce="amin")
        out = {"user_index": uniq}
        for name in ("rank", "target_rating", "liked"):
            out[name] = dim_zero_cat(getattr(self, name))[first]
        for name, state in zip(self.extra, self._extra_states()):
            out[name] = dim_zero_cat(getattr(self, state))[first]
        return out

    @staticmethod
    def per_user_metrics(rank: torch.Tensor, ks: tuple[int, ...] = (10, 50)) -> dict[str, torch.Tensor]:
        """Per-user metric values from 0-based ranks."""
        rank = rank.double()
        out = {}
        for k in ks:
            hit = rank < k
            out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(rank + 2.0), torch.zeros_like(rank))
            out[f"hr@{k}"] = hit.double()
        out["mrr"] = 1.0 / (rank + 1.0)
        return out

    def compute(self) -> dict[str, float]:
        rows = self.per_user()
        per_user = self.per_user_metrics(rows["rank"], self.ks)
        liked = rows["liked"]
        hit10 = rows["rank"] < 10
        out = {name: values.mean().item() for name, values in per_user.items()}
        out["ndcg@10_liked"] = per_user["ndcg@10"][liked].mean().item() if liked.any() else math.nan
        out["hr@10_liked"] = per_user["hr@10"][liked].mean().item() if liked.any() else math.nan
        out["rating@10"] = rows["target_rating"][hit10].double().mean().item() if hit10.any() else math.nan
        out["coverage@10"] = (self.covered[1:].sum() / self.n_items).item()
        for name in self.extra:
            out[name] = rows[name].double().mean().item()
        out["n_users"] = float(len(rows["user_index"]))
        return out
