"""Filtered behaviour cloning: next-item cross-entropy on the logged targets rated at least ``min_rating``.

The plainest control for ExpSFT (``../shared/docs/fair-comparison.md``, "controls that could explain the
win away"): if upweighting well-rated targets is all that matters, training on them alone should do as well.
It is the reward-weighted SFT of ``RewardWeightedModule`` with a 0/1 weight per target, so the weight
normalisations are ExpSFT's: ``batch_mean`` (default) is the mean cross-entropy over the batch's kept
targets, i.e. SFT on the filtered data; ``none`` (and ``fixed``, whose bound is 1) the kept targets' summed
cross-entropy over all of the batch's targets.

**ExpSFT's lambda -> 0 limit**, precisely: with ``batch_mean`` ExpSFT's weights ``exp((r - max r) / lam)``
over their batch mean tend, as lam -> 0, to ``N / n_max`` on the batch's targets of the highest reward and 0
on the others: exactly filtered BC with ``min_rating`` = that batch's highest rating (every
``data.reward_transform`` is increasing in the rating). A fixed ``min_rating`` is that limit only in batches
whose best target has exactly that rating; in practice (5-star targets in almost every batch) ExpSFT at small
lambda is close to filtered BC at 5 stars.

A batch with no kept target has weight 0 everywhere: loss 0 (no update beyond Adam's momentum) and ``kept``
logs 0; a threshold above the data's highest rating is refused at the start of fit.
"""

from __future__ import annotations

import torch

from recpost.core.batch import TrainBatch
from recpost.core.errors import RecpostError
from recpost.methods.checks import finite, optional
from recpost.methods.losses import linear_reward_weights
from recpost.methods.weighted import RewardWeightedModule


class FilteredBC(RewardWeightedModule):
    """Cross-entropy of the logged next item on the targets with ``rating >= min_rating`` (weight 1), none on the
    others (weight 0).

    Args:
        min_rating: keep targets rated at least this, on the data's rating scale (stars, before
            ``data.reward_transform``); ``null`` (default): ``data.liked_threshold`` (4 on 5-star data), the
            project's "liked" and KTO's desirable targets.
        **kwargs: ``weight_norm`` (``batch_mean``: the mean over the kept targets, default; ``none`` / ``fixed``:
            their sum over all targets), ``max_weight`` (``RewardWeightedModule``), the shared settings of
            ``NextItemModule`` (softmax: full | sampled, target_norm, ...) and ``RecModule`` (lr, init_from, ...).
    """

    bound_setting = None  # 0/1 weights: the fixed normaliser is 1

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        optional(finite, "min_rating", s["min_rating"], hint="e.g. 4 or 5 on 5-star data; null: data.liked_threshold")
        super().check_settings(**settings)

    def __init__(self, *args, min_rating: float | None = None, **kwargs) -> None:
        self.check_settings_once(dict(min_rating=min_rating, **kwargs))
        super().__init__(*args, **kwargs)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "rating_range"):
            self.check_threshold(datamodule)

    def check_threshold(self, datamodule) -> None:
        """Refuse a threshold no target of ``datamodule`` (a ``RecDataModule``) can reach (every batch empty)."""
        threshold = self.hparams.min_rating
        threshold = datamodule.liked_threshold if threshold is None else threshold
        low, high = datamodule.rating_range
        if threshold > high:
            raise RecpostError(f"model.min_rating {threshold:g} is above the data's highest rating {high:g}: no target "
                               f"would be kept; use a threshold in [{low:g}, {high:g}] (null: data.liked_threshold)")

    def kept(self, batch: TrainBatch) -> torch.Tensor:
        """Which of the batch's targets (``next_items > 0``, in that order) pass the threshold ``[N]`` bool."""
        has_target = batch["next_items"] > 0  # [B, L]
        if self.hparams.min_rating is None:
            return batch["next_liked"][has_target]
        return batch["next_ratings"][has_target] >= self.hparams.min_rating

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = self.next_item_targets(batch)
        keep = self.kept(batch)  # [N]
        # 0/1 weights through the linear weights' normalisations (batch_mean: over the global batch's mean; all
        # zero when nothing passes, never 0 / 0)
        weights = linear_reward_weights(keep.float(), self.hparams.weight_norm, self.hparams.max_weight, 1.0,
                                        self.gather)  # [N]
        loss, logs = self.weighted_loss(targets, weights, batch)
        logs.update(kept=keep.sum().float(), kept_share=keep.float().mean())
        return loss, logs
