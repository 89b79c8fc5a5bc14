"""``RewardModel``: trains the reward-model component (``recpost.models.RatingModel``: the backbone
and a rating head, see ``recpost/models/reward.py`` for the head's formula) to predict the rating of
the logged next item, by MSE at every position of the training windows, from the pretrained
checkpoint (``init_from``).

PPO and DPO use the trained component frozen (``recpost.models.checkpoint.load_reward_model``) as their
reward; any method can be scored by one at evaluation (``eval_reward_model``). The RM predicts
ratings on the source's scale (stars), whatever ``data.reward_transform``: its RMSE is comparable
with the literature.

Evaluation (``RatingModule``, shared with the matrix-factorisation ``MFRewardModel``): ``rmse``, ``mae`` and
``bias`` of the held-out target's rating next to the global-mean, item-mean and user-mean baselines, plus the
ranking metrics of the RM used as a policy. Select its checkpoint on ``val/rmse``
(``configs/method/reward_model.yaml`` sets ``checkpoint.monitor: val/rmse``, mode min).
"""

from __future__ import annotations

import numpy as np
import torch

from recpost.core.batch import TrainBatch
from recpost.methods.checks import non_negative
from recpost.methods.rating_base import RatingModule, rating_baselines
from recpost.models import RatingHead, RatingModel

__all__ = ["RewardModel", "rating_baselines"]


class RewardModel(RatingModule):
    """Rating regression on the backbone's state; the trained component is ``rating_model``.

    Args:
        prior_count: pseudo-count that shrinks item and user mean deviations toward the global mean
            (an item rated n times keeps ``n / (n + prior_count)`` of its deviation).
        **kwargs: the shared settings of ``RecModule`` (backbone, lr, init_from, ...).
    """

    @classmethod
    def check_settings(cls, **settings) -> None:
        non_negative("prior_count", {**cls.setting_defaults(), **settings}["prior_count"],
                     "e.g. 5: an item rated 5 times keeps half its mean deviation")
        super().check_settings(**settings)

    def __init__(self, *args, prior_count: float = 5.0, **kwargs) -> None:
        self.check_settings_once(dict(prior_count=prior_count, **kwargs))
        super().__init__(*args, **kwargs)
        self.head = RatingHead(self.hparams.n_items, self.backbone.item_weights().shape[1], prior_count)

    @property
    def rating_model(self) -> RatingModel:
        """The component being trained: this module's backbone and head, viewed as a ``RatingModel``.

        It is kept out of the module tree (not a submodule), so the checkpoint's keys stay ``backbone.*``
        and ``head.*``, exactly what ``recpost.models.checkpoint.load_reward_model`` reads.
        """
        model = self.__dict__.get("_rating_model")
        if model is None or model.backbone is not self.backbone or model.head is not self.head:
            model = RatingModel(self.backbone, self.head)
            self.__dict__["_rating_model"] = model
        return model

    # ----------------------------------------------------------------------------------- training
    def init_biases(self, item: np.ndarray, rating: np.ndarray, weight: np.ndarray | None = None) -> None:
        """Start the head at the damped baseline predictor of these training interactions (each counted
        ``weight`` times: a user's count in a bootstrap resample)."""
        weight = np.ones(len(item)) if weight is None else weight.astype(np.float64)
        n = self.hparams.n_items + 1
        item_sum = torch.from_numpy(np.bincount(item, weights=rating.astype(np.float64) * weight, minlength=n))
        item_count = torch.from_numpy(np.bincount(item, weights=weight, minlength=n))
        global_mean = float((rating * weight).sum() / weight.sum())
        self.head.init_biases(global_mean, item_sum, item_count)

    def on_fit_start(self) -> None:
        if not bool(self.head.initialized):  # a restored checkpoint already has its biases
            train = self.trainer.datamodule.training_interactions()
            self.init_biases(train.item, train.rating, train.weight)

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        has_target = batch["next_items"] > 0  # [B, L]
        targets = batch["next_items"][has_target]  # [N]
        pred = self.rating_model.rewards_at(batch["input_items"], batch["input_ratings"], has_target,
                                            targets[:, None], batch.get("input_timestamps")).squeeze(-1)  # [N], fp32
        mse = ((pred - batch["next_ratings"][has_target].float()) ** 2).mean()
        return mse, {"rmse": mse.detach().sqrt()}
