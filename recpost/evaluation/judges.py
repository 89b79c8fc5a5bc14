"""Reward models as judges: an ensemble of K independently trained reward models scores a policy's top 10.

The predecessor of the paper judged policies by an ensemble of reward models ("reward model as a
judge"). Each judge ``k`` gives, per user, its mean predicted rating of the policy's top 10
(``judge<k>_reward@10``); ``judge_reward@10`` is the mean over judges, per user and so (the same users
for every judge) also of the judges' means over users. ``judge_reward@10_std`` is the spread across
judges: the standard deviation (Bessel-corrected) of the K judges' means over users, given for K >= 2.
A policy that pleases the reward model it was trained against but not judges trained on other seeds
and other users (bootstrap resamples) exploits that model's errors.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

import torch

JUDGE_METRIC = "judge_reward@10"
JUDGE_SPREAD = "judge_reward@10_std"


def judge_metric(k: int) -> str:
    """The per-judge metric of judge ``k`` (0-based): ``judge<k>_reward@10``."""
    return f"judge{k}_reward@10"


def judge_metric_names(n_judges: int) -> tuple[str, ...]:
    """The per-user metrics of ``n_judges`` judges: the mean over judges, then each judge's own."""
    return (JUDGE_METRIC, *(judge_metric(k) for k in range(n_judges))) if n_judges else ()


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
