"""Judges: rating models trained independently of the reward models a method trains against, that score
each policy's top 10, and how far they agree with the training reward model where the policy goes.

**Ratings.** Each judge ``k`` gives, per user, its mean predicted rating of the policy's top 10
(``judge<k>_reward@10``); ``judge_reward@10`` is the mean over judges, per user and so (the same users
for every judge) also of the judges' means over users. ``judge_reward@10_std`` is the spread across
judges: the standard deviation (Bessel-corrected) of the K judges' means over users, given for K >= 2.

**Agreement with the training reward model** (with ``judge_reference``, the RM the methods train against;
at test time). A policy that pleases the training RM but not the judges exploits the RM's errors, but
only if the judges could have disagreed with it: judges that share its data, initialisation and
architecture err where it errs. Two per-user measures, off the logged support (the items recommended are
ones the user has not rated), say how independent the panel is:

- ``judge<k>_rank_corr@10``: the **Spearman** rank correlation (average ranks for ties) between judge
  ``k``'s and the training RM's predicted ratings of the user's 10 recommended items (0 where either
  scores them all alike: no order to agree on);
- ``judge<k>_rm_overlap@10``: the share of the training RM's own top 10 of the catalog (the user's history
  masked, as the policy's) that is also in judge ``k``'s top 10: where a policy that maximised the RM would
  go, does the judge also rate highest? It does not depend on the policy, only on the user.

``judge_rank_corr@10`` and ``judge_rm_overlap@10`` are their means over judges. Both are 1 for a judge
that is a copy of the training RM, and a panel that agrees with it at 1 cannot tell exploitation of the RM
from a real move to well-rated items. Scoring the catalog goes ``chunk_size`` items at a time, so memory
stays at ``[B, chunk_size]`` whatever the catalog.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from recpost.evaluation.ranking import TOP_K, rank_in_chunks

JUDGE_METRIC = "judge_reward@10"
JUDGE_SPREAD = "judge_reward@10_std"
RANK_CORR_METRIC = "judge_rank_corr@10"
OVERLAP_METRIC = "judge_rm_overlap@10"


class Judge(Protocol):
    """What a judge (and the training RM it is compared with) answers: ``RatingModel`` and ``MFRatingModel``."""

    def predict_rewards(self, input_items: torch.Tensor, input_ratings: torch.Tensor,
                        candidates: torch.Tensor | None = None,
                        input_timestamps: torch.Tensor | None = None) -> torch.Tensor: ...

    def column_scorer(self, input_items: torch.Tensor, input_ratings: torch.Tensor,
                      input_timestamps: torch.Tensor | None = None) -> Callable[[slice | torch.Tensor], torch.Tensor]: ...


def judge_metric(k: int) -> str:
    """The per-judge metric of judge ``k`` (0-based): ``judge<k>_reward@10``."""
    return f"judge{k}_reward@10"


def rank_corr_metric(k: int) -> str:
    """Judge ``k``'s rank correlation with the training RM on the recommended items: ``judge<k>_rank_corr@10``."""
    return f"judge{k}_rank_corr@10"


def overlap_metric(k: int) -> str:
    """Judge ``k``'s share of the training RM's top 10 of the catalog: ``judge<k>_rm_overlap@10``."""
    return f"judge{k}_rm_overlap@10"


def judge_metric_names(n_judges: int, agreement: bool = False) -> tuple[str, ...]:
    """The per-user metrics of ``n_judges`` judges: the mean over judges, then each judge's own; with
    ``agreement`` (a training RM to compare with) also the rank correlations and overlaps."""
    if not n_judges:
        return ()
    names = (JUDGE_METRIC, *(judge_metric(k) for k in range(n_judges)))
    if agreement:
        names += (RANK_CORR_METRIC, *(rank_corr_metric(k) for k in range(n_judges)),
                  OVERLAP_METRIC, *(overlap_metric(k) for k in range(n_judges)))
    return names


def judge_rewards(ratings: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-user values ``name -> [B]`` from each judge's mean rating of each user's top 10 ``[K, B]``."""
    out = {JUDGE_METRIC: ratings.float().mean(dim=0)}
    out.update({judge_metric(k): ratings[k].float() for k in range(ratings.shape[0])})
    return out


def judge_spread(values: Mapping[str, float], n_judges: int) -> dict[str, float]:
    """``{judge_reward@10_std: std over judges of their means over users}`` for ``n_judges >= 2`` (else ``{}``)."""
    if n_judges < 2:
        return {}
    return {JUDGE_SPREAD: statistics.stdev(float(values[judge_metric(k)]) for k in range(n_judges))}


def average_ranks_by_row(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..K-1`` within each row of ``values [B, K]``, ties sharing their mean rank (fp64): the number
    of smaller values plus half the number of other equal ones (``K x K`` comparisons: meant for small K)."""
    v = values.double()
    less = (v.unsqueeze(-1) > v.unsqueeze(-2)).sum(-1)  # [B, K]: values below each one
    equal = (v.unsqueeze(-1) == v.unsqueeze(-2)).sum(-1)  # [B, K]: itself included
    return less + (equal - 1) / 2.0


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's correlation of each row of ``a [B, K]`` with the same row of ``b [B, K]`` ``-> [B]``
    (Pearson's of average ranks); 0 for a row where either side is constant."""
    ra, rb = average_ranks_by_row(a), average_ranks_by_row(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    denom = ra.norm(dim=-1) * rb.norm(dim=-1)
    corr = torch.where(denom > 0, (ra * rb).sum(-1) / denom.clamp(min=1e-300), torch.zeros_like(denom))
    return corr.clamp(-1.0, 1.0).float()  # rounding may step just past +-1


def top_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The share of each row's items of ``a [B, K]`` that are also in the same row of ``b [B, K]`` ``-> [B]``
    (items of a row are distinct, as a top-K's are)."""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean(-1)


def judge_values(
    judges: Sequence[Judge], batch: Mapping[str, torch.Tensor], top: torch.Tensor, reference: Judge | None = None,
    n_columns: int | None = None, chunk_size: int | None = None, history: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-user values ``name -> [B]`` of the module docstring for the policy's ``top [B, 10]`` items.

    Args:
        judges: the judges, in order.
        batch: the evaluation batch (``input_items``, ``input_ratings``, ``input_timestamps``).
        top: the policy's top 10 per user ``[B, 10]``.
        reference: the training RM; without it, only the judges' ratings.
        n_columns: the catalog's columns (``n_items + 1``), to rank it for the overlap.
        chunk_size: columns scored at a time (``None``: all at once).
        history: ``[B, H]`` items masked from the catalog top 10 (``None``: none masked).
    """
    inputs = (batch["input_items"], batch["input_ratings"])
    stamps = batch.get("input_timestamps")
    scores = [judge.predict_rewards(*inputs, top, stamps).float() for judge in judges]  # each [B, 10]
    out = judge_rewards(torch.stack([s.mean(dim=-1) for s in scores]))  # from [K, B]
    if reference is None:
        return out
    if n_columns is None:
        raise ValueError("judge_values: the agreement with a reference needs n_columns (the catalog's size + 1)")

    def catalog_top(model: Judge) -> torch.Tensor:  # [B, 10]: the model's own top 10, chunk by chunk
        ranking = rank_in_chunks(model.column_scorer(*inputs, stamps), n_columns, chunk_size or n_columns,
                                 history=history, k=TOP_K)
        return ranking.top_items[:, :TOP_K]

    ref_scores = reference.predict_rewards(*inputs, top, stamps).float()  # [B, 10]
    ref_top = catalog_top(reference)
    corr = [rank_correlation(ref_scores, s) for s in scores]
    overlap = [top_overlap(ref_top, catalog_top(judge)) for judge in judges]
    out[RANK_CORR_METRIC] = torch.stack(corr).mean(dim=0)
    out[OVERLAP_METRIC] = torch.stack(overlap).mean(dim=0)
    out.update({rank_corr_metric(k): c for k, c in enumerate(corr)})
    out.update({overlap_metric(k): o for k, o in enumerate(overlap)})
    return out
