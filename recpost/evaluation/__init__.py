"""Full-catalog ranking evaluation shared by every method."""

from recpost.evaluation.judges import (
    JUDGE_METRIC, JUDGE_SPREAD, OVERLAP_METRIC, RANK_CORR_METRIC, judge_metric, judge_metric_names, judge_rewards,
    judge_spread, judge_values, overlap_metric, rank_corr_metric, rank_correlation, top_overlap,
)
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
    "JUDGE_METRIC", "JUDGE_SPREAD", "OVERLAP_METRIC", "RANK_CORR_METRIC", "judge_metric", "judge_metric_names",
    "judge_rewards", "judge_spread", "judge_values", "overlap_metric", "rank_corr_metric", "rank_correlation", "top_overlap",
    "TOP_K", "CatalogRanking", "RankingMetrics", "ScoreColumns", "mask_items", "mask_items_in_chunk", "rank_in_chunks",
    "target_ranks",
]
