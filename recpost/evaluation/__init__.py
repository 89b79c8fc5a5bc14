"""Full-catalog ranking evaluation shared by every method."""

from recpost.evaluation.judges import JUDGE_METRIC, JUDGE_SPREAD, judge_metric, judge_metric_names, judge_rewards, judge_spread
from recpost.evaluation.ranking import (
    TOP_K,
    CatalogRanking,
    RankingMetrics,
    ScoreColumns,
    mask_items,
    mask_items_in_chunk,
    rank_in_chunks,
    target_ranks,
)

__all__ = [
    "JUDGE_METRIC", "JUDGE_SPREAD", "judge_metric", "judge_metric_names", "judge_rewards", "judge_spread",
    "TOP_K", "CatalogRanking", "RankingMetrics", "ScoreColumns", "mask_items", "mask_items_in_chunk", "rank_in_chunks",
    "target_ranks",
]
