"""Ranking metrics over the full catalog, exact under DDP.

Ties are broken pessimistically: the target's rank counts every other item scoring at least as high,
so a model that scores all items equally ranks every target last, not first.

Lightning's distributed sampler pads the last evaluation shard with repeated users. The metric keeps
one row per evaluated user (``cat`` states, gathered once in ``compute``) and drops repeated user
indices before averaging, so 2 ranks give exactly the numbers of 1. Coverage is a union, which
repeats cannot change.

The metrics need only the target's rank and each user's top-10, a :class:`CatalogRanking`. It comes
from the whole ``[B, n_items + 1]`` score matrix, or, for large catalogs, from :func:`rank_in_chunks`,
which scores a chunk of items at a time and never holds more than ``[B, chunk_size]`` scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def mask_items(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Set ``scores[b, items[b, j]] = -inf`` in place (item 0, padding, is always masked)."""
    scores.scatter_(1, items, float("-inf"))
    scores[:, 0] = float("-inf")
    return scores


def mask_items_in_chunk(scores: torch.Tensor, items: torch.Tensor, start: int) -> torch.Tensor:
    """``mask_items`` for a chunk ``scores [B, C]`` holding the catalog's columns ``start .. start + C - 1``:
    the ``items [B, H]`` that fall inside it are set to ``-inf`` in place (and padding, if the chunk has it)."""
    local = items - start  # [B, H]
    inside = (local >= 0) & (local < scores.shape[1])
    rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(local)
    scores[rows[inside], local[inside]] = float("-inf")
    if start == 0:
        scores[:, 0] = float("-inf")
    return scores


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items, counting ties against it. ``[B, V], [B] -> [B]``."""
    target_score = scores.gather(1, target[:, None])  # [B, 1]
    return (scores >= target_score).sum(1) - 1


TOP_K = 10  # the cut-off of coverage@10 and of the reward-model metrics (rm_reward@10)

# ``columns -> [B, K]`` fp32 scores of the same catalog columns for every user of a batch: a slice of
# the ``n_items + 1`` columns (a chunk; ``slice(None)`` = all) or item ids ``[K]``. Padding is -inf.
ScoreColumns = Callable[[slice | torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CatalogRanking:
    """What the metrics use of a catalog's scores: each user's ``top_items [B, k]`` and their
    ``top_scores [B, k]`` (best first), and the target's 0-based pessimistic ``rank [B]`` (``None``
    when there is no target, as in prediction)."""

    top_items: torch.Tensor
    top_scores: torch.Tensor
    rank: torch.Tensor | None = None

    @classmethod
    def from_scores(cls, scores: torch.Tensor, target: torch.Tensor | None = None, k: int = TOP_K) -> CatalogRanking:
        """From the whole score matrix ``[B, n_items + 1]`` (already masked)."""
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        return cls(top.indices, top.values, target_ranks(scores, target) if target is not None else None)


def rank_in_chunks(
    score_columns: ScoreColumns,
    n_columns: int,
    chunk_size: int,
    target: torch.Tensor | None = None,  # [B]
    history: torch.Tensor | None = None,  # [B, H] items to mask (None: no history masking)
    k: int = TOP_K,
) -> CatalogRanking:
    """``CatalogRanking.from_scores`` of the masked ``score_columns(slice(None))``, ``chunk_size`` columns at a time.

    Memory is ``[B, chunk_size]`` whatever ``n_columns``. The top-k is merged chunk by chunk; the rank
    counts, chunk by chunk, the items scoring at least the target (ties count against it, masked
    items are ``-inf``, a masked target ranks last), exactly as :func:`target_ranks`. That needs the
    target's score before the first chunk: it comes from one small matmul over the batch's target
    columns, and is then checked against the target's score in its own chunk. If any differs in the
    last bit (a BLAS may round another matrix shape differently), the counts are redone against the
    chunk's value in a second pass, so the rank is always consistent with the chunk scores.
    Among exactly tied scores, which items make the top-k is unspecified (as for ``torch.topk``).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    chunks = [(start, min(start + chunk_size, n_columns)) for start in range(0, n_columns, chunk_size)]

    def chunk_scores(start: int, stop: int) -> torch.Tensor:
        scores = score_columns(slice(start, stop))  # [B, C]
        return mask_items_in_chunk(scores, history, start) if history is not None else scores

    estimate = _target_scores(score_columns, target, history, chunk_size) if target is not None else None
    top_items = top_scores = count = exact = None
    for start, stop in chunks:
        scores = chunk_scores(start, stop)
        top = scores.topk(min(k, stop - start), dim=1)
        values, items = top.values, top.indices + start
        if top_scores is not None:
            values, pick = torch.cat([top_scores, values], dim=1).topk(min(k, stop), dim=1)
            items = torch.cat([top_items, items], dim=1).gather(1, pick)
        top_scores, top_items = values, items
        if target is not None:
            ge = (scores >= estimate[:, None]).sum(1, dtype=torch.int32)  # int32: 2x faster than int64 on CPU
            count = ge if count is None else count + ge
            inside = (target >= start) & (target < stop)
            here = scores.gather(1, (target - start).clamp(0, stop - start - 1)[:, None]).squeeze(1)
            exact = torch.where(inside, here, estimate if exact is None else exact)
    if target is None:
        return CatalogRanking(top_items, top_scores)
    if not torch.equal(exact, estimate):
        count = sum((chunk_scores(start, stop) >= exact[:, None]).sum(1, dtype=torch.int32) for start, stop in chunks)
    return CatalogRanking(top_items, top_scores, count.long() - 1)


def _target_scores(
    score_columns: ScoreColumns, target: torch.Tensor, history: torch.Tensor | None, block: int
) -> torch.Tensor:
    """Each user's score of their own target ``[B]`` (``-inf`` if masked), from ``score_columns`` of the
    batch's targets, ``block`` target columns at a time (the diagonal of ``[B, B]`` scores)."""
    parts = []
    for start in range(0, target.shape[0], block):
        columns = target[start:start + block]
        scores = score_columns(columns)  # [B, len(columns)]
        parts.append(scores[start:start + block].diagonal())
    estimate = torch.cat(parts)  # [B]
    masked = target == 0
    if history is not None:
        masked |= (history == target[:, None]).any(1)
    return estimate.masked_fill(masked, float("-inf"))


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
        scores: torch.Tensor | CatalogRanking,  # [B, n_items + 1], already masked; or their ranking
        target_item: torch.Tensor,  # [B]
        target_rating: torch.Tensor,  # [B]
        target_liked: torch.Tensor,  # [B] bool
        user_index: torch.Tensor,  # [B]
        extra: dict[str, torch.Tensor] | None = None,  # name -> [B]
    ) -> None:
        """``scores`` is the masked score matrix, or a ``CatalogRanking`` built for ``target_item``
        (with at least the top-10; e.g. from :func:`rank_in_chunks`)."""
        ranking = scores if isinstance(scores, CatalogRanking) else CatalogRanking.from_scores(scores.float(), target_item)
        if ranking.rank is None:
            raise ValueError("RankingMetrics.update needs a CatalogRanking with the target's rank")
        self.user_index.append(user_index.long())
        self.rank.append(ranking.rank)
        self.target_rating.append(target_rating.float())
        self.liked.append(target_liked.bool())
        top = ranking.top_items[:, :TOP_K]  # [B, 10]
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
