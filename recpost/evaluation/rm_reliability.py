"""How reliable is a reward model where it matters? Its errors against the true reward, by group.

A policy optimised against a reward model goes where the model scores high, which is not where its
training ratings were: an RM that is accurate on average can be badly wrong on rarely exposed items
and outside the logged support, and that is where RLHF-style methods find its errors. Only a world
that knows ``r*`` (the simulator) can measure this; :func:`reliability_report` does, from plain
tensors, so the data layer, ``python -m recpost.diagnostics.reward_check`` and the experiment share one definition:

- ``overall``: every evaluated (state, item) pair;
- ``exposure_decile_1`` .. ``exposure_decile_10``: pairs grouped by their item's exposure decile
  (decile 1 = the tenth of the items ``pi_beta`` shows least, 10 = most);
- ``in_support`` / ``out_of_support``: pairs whose item is / is not in the logged support (the caller
  decides what that is, e.g. "the training log has at least one rating of the item");
- any ``extra_groups`` the caller names (e.g. ``rm_top10``: the RM's own top 10 per state, where a
  policy that maximises it goes; a positive ``bias`` there is the winner's curse).

Per group: ``n`` (pairs), ``rmse`` and ``bias`` (mean signed error) of the prediction against ``r*``,
and ``spearman``, the rank correlation of the prediction with ``r*`` (average ranks for ties; NaN for
fewer than two pairs or a constant side): what ranking by the RM gets right, whatever its scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from recpost.core.errors import RecpostError

METRICS = ("n", "rmse", "bias", "spearman")


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..N-1`` of ``values [N]`` in ascending order, ties sharing their mean rank (fp64)."""
    values = values.double().flatten()
    n = len(values)
    order = values.argsort(stable=True)
    sorted_values = values[order]
    # Runs of equal values: each element gets the mean of the positions of its run.
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sorted_values[1:] != sorted_values[:-1]
    run = new_run.cumsum(0) - 1  # [N] run index of each sorted position
    positions = torch.arange(n, dtype=torch.float64)
    run_sum = torch.zeros(int(run[-1]) + 1 if n else 0, dtype=torch.float64).index_add_(0, run, positions)
    run_len = torch.zeros_like(run_sum).index_add_(0, run, torch.ones(n, dtype=torch.float64))
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = (run_sum / run_len)[run]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of aligned ``a [N]`` and ``b [N]`` (NaN if undefined)."""
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


def _group(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    err = pred - truth
    n = len(err)
    return {
        "n": float(n),
        "rmse": float(err.pow(2).mean().sqrt()) if n else math.nan,
        "bias": float(err.mean()) if n else math.nan,
        "spearman": spearman(pred, truth),
    }


def exposure_deciles(item_exposure: torch.Tensor, n_bins: int = 10) -> torch.Tensor:
    """The exposure bin of every item ``[V] -> [V]`` in ``1..n_bins`` (1 = least exposed): items sorted
    by exposure (ties by index) and cut into ``n_bins`` groups of equal size (+-1)."""
    n = len(item_exposure)
    order = item_exposure.double().argsort(stable=True)
    bins = torch.empty(n, dtype=torch.long)
    bins[order] = torch.arange(n) * n_bins // max(n, 1) + 1
    return bins


def reliability_report(
    pred: torch.Tensor,
    r_star: torch.Tensor,
    item: torch.Tensor,
    item_exposure: torch.Tensor,
    in_support: torch.Tensor,
    n_bins: int = 10,
    extra_groups: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """The reward model's errors against ``r*``, overall, by item-exposure decile and by support.

    Args:
        pred: the RM's predicted reward of each evaluated (state, item) pair ``[N]``.
        r_star: the true reward of the same pairs ``[N]``.
        item: the item of each pair ``[N]``, an index into ``item_exposure`` (``0..V-1``).
        item_exposure: how much ``pi_beta`` exposes each item ``[V]`` (any monotone measure: its mean
            probability over states, or its count in the log); only its order is used.
        in_support: whether each pair is inside the logged support ``[N]`` (bool).
        n_bins: exposure groups (10: deciles).
        extra_groups: more groups, ``name -> [N]`` bool masks of the pairs.

    Returns:
        ``"<group>/<metric>" -> value`` for the groups of the module docstring and the metrics of
        ``METRICS`` (``exposure_decile_<k>`` for ``k = 1..n_bins``).
    """
    pred, r_star = pred.double().flatten(), r_star.double().flatten()
    item, in_support = item.flatten().long(), in_support.flatten()
    if not (len(pred) == len(r_star) == len(item) == len(in_support)):
        raise RecpostError(
            f"reliability report: pred, r_star, item and in_support must be aligned, got lengths {len(pred)}, "
            f"{len(r_star)}, {len(item)}, {len(in_support)}"
        )
    if in_support.dtype != torch.bool:
        raise RecpostError(f"reliability report: in_support must be a bool tensor (got {in_support.dtype})")
    if n_bins < 1 or n_bins > max(1, len(item_exposure)):
        raise RecpostError(f"reliability report: n_bins must be in 1..{len(item_exposure)} (the items), got {n_bins}")
    if len(item) and (int(item.min()) < 0 or int(item.max()) >= len(item_exposure)):
        raise RecpostError(
            f"reliability report: item ids must index item_exposure (0..{len(item_exposure) - 1}), got "
            f"{int(item.min())}..{int(item.max())}"
        )
    groups = {"overall": torch.ones_like(in_support)}
    pair_bin = exposure_deciles(item_exposure, n_bins)[item]  # [N]
    for k in range(1, n_bins + 1):
        groups[f"exposure_decile_{k}"] = pair_bin == k
    groups["in_support"], groups["out_of_support"] = in_support, ~in_support
    for name, keep in (extra_groups or {}).items():
        keep = keep.flatten()
        if keep.dtype != torch.bool or len(keep) != len(pred):
            raise RecpostError(f"reliability report: group {name!r} must be a bool mask of the {len(pred)} pairs")
        groups[name] = keep
    report: dict[str, float] = {}
    for name, keep in groups.items():
        for metric, value in _group(pred[keep], r_star[keep]).items():
            report[f"{name}/{metric}"] = value
    return report
