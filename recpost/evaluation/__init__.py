"""Full-catalog ranking evaluation shared by every method."""

from recpost.evaluation.ranking import RankingMetrics, mask_items, target_ranks

__all__ = ["RankingMetrics", "mask_items", "target_ranks"]
