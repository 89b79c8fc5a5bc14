"""Linear reward-weighted SFT: next-item cross-entropy weighted by the reward itself, ``w = r``.

The paper's baseline next to exponential weighting (Chidambaram et al., 2026). Its population
optimum is ``pi*(a|s) ∝ pi_beta(a|s) * r(s, a)``: a fixed, mild tilt toward better-rated items with no
temperature to tune, and no way to be greedier than the ratio of the ratings (5 stars weigh 5 times
1 star on identity rewards).

Weights must be ``>= 0``, so rewards must be: ``data.reward_transform: identity`` (stars) or ``minmax``
([0, 1], where the lowest rating gets weight 0); ``centered`` rewards are negative below the mean and a
batch that has one is refused.
"""

from __future__ import annotations

import torch

from recpost.core.batch import TrainBatch
from recpost.methods.checks import finite_positive, optional
from recpost.methods.losses import check_finite_rewards, linear_reward_weights
from recpost.methods.weighted import RewardWeightedModule


class LinearSFT(RewardWeightedModule):
    """Cross-entropy of the logged next item weighted by its reward ``r >= 0``.

    Args:
        reward_max: the largest possible reward, for ``weight_norm: fixed`` (weights ``r / reward_max``, in
            [0, 1]); ``null``: the top of the data's rating scale under ``data.reward_transform`` (5 with
            identity on 1..5 stars, 1 with minmax), read at the start of fit.
        **kwargs: ``weight_norm`` (``batch_mean``: ``r`` over its global batch mean, default; ``none``: ``r``
            itself, the paper's form; ``fixed``), ``max_weight`` (``RewardWeightedModule``), and the shared
            settings of ``NextItemModule`` and ``RecModule``.
    """

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        optional(finite_positive, "reward_max", s["reward_max"], hint="null reads it from the data's rating scale")
        super().check_settings(**settings)

    def __init__(self, *args, reward_max: float | None = None, **kwargs) -> None:
        self.check_settings_once(dict(reward_max=reward_max, **kwargs))
        super().__init__(*args, **kwargs)

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = self.next_item_targets(batch)
        check_finite_rewards(targets.rewards)
        weights = linear_reward_weights(targets.rewards, self.hparams.weight_norm, self.hparams.max_weight, self.weight_bound,
                                        self.gather)  # [N]
        return self.weighted_loss(targets, weights, batch)
