"""Exponential reward-weighted SFT: next-item cross-entropy weighted by ``exp(reward / lam)``.

The method this project exists for (Chidambaram et al., 2026). It uses observed rewards only - no
reward model to hack, no propensities - and is fully offline. Its population optimum is
``pi*(a|s) ∝ pi_beta(a|s) * exp(r(s, a) / lam)``: small ``lam`` concentrates on the best-rated
items (more improvement, more variance and noise sensitivity); ``lam -> inf`` is plain SFT.

``lam`` is on the scale of the DataModule's ``reward_transform``: with ``identity`` on 1..5 stars,
``lam = 1`` makes a 5-star target weigh e^4 ~ 55 times a 1-star one; with ``minmax`` ([0, 1]) the
same ratio needs ``lam = 0.25``. ``centered`` only shifts rewards, which a normalised weight ignores.
"""

from __future__ import annotations

import torch

from recpost.core.batch import TrainBatch
from recpost.methods.checks import finite, finite_positive, optional
from recpost.methods.losses import check_finite_rewards, exp_reward_weights
from recpost.methods.weighted import RewardWeightedModule


class ExpSFT(RewardWeightedModule):
    """Cross-entropy of the logged next item weighted by ``exp(reward / lam)``.

    Args:
        lam: temperature lambda > 0 (on the reward scale; see the module docstring).
        reward_max: the largest possible reward, for ``weight_norm: fixed`` (weights
            ``exp((r - reward_max) / lam)``, in (0, 1]); ``null``: the top of the data's rating scale under
            ``data.reward_transform`` (5 with identity on 1..5 stars, 1 with minmax), read at the start of fit.
        **kwargs: ``weight_norm`` (``batch_mean``: over the global batch mean, default; ``none``: raw
            ``exp(r / lam)``, the paper's Algorithm 1; ``fixed``), ``max_weight`` (``RewardWeightedModule``),
            the shared settings of ``NextItemModule`` (softmax: full | sampled, ...) and ``RecModule``
            (backbone, lr, init_from, ...). With a sampled softmax the weights multiply each target's
            sampled cross-entropy, so ``lam -> inf`` is SFT with the same sampled softmax.
    """

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        finite_positive("lam", s["lam"], "try 0.25-4 on 1..5-star rewards")
        optional(finite, "reward_max", s["reward_max"], hint="null reads it from the data's rating scale")
        super().check_settings(**settings)

    def __init__(self, *args, lam: float = 1.0, reward_max: float | None = None, **kwargs) -> None:
        self.check_settings_once(dict(lam=lam, reward_max=reward_max, **kwargs))
        super().__init__(*args, **kwargs)

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = self.next_item_targets(batch)
        check_finite_rewards(targets.rewards)
        weights = exp_reward_weights(targets.rewards, self.hparams.lam, self.hparams.weight_norm, self.hparams.max_weight,
                                     self.weight_bound, self.gather)  # [N]
        return self.weighted_loss(targets, weights, batch)
