"""Full-catalog ranking evaluation shared by every method."""

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
    "TOP_K", "CatalogRanking", "RankingMetrics", "ScoreColumns", "mask_items", "mask_items_in_chunk", "rank_in_chunks",
    "target_ranks",
]
