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

from recpost.batch import TrainBatch
from recpost.methods.checks import finite_positive, one_of, optional, positive
from recpost.methods.losses import WEIGHT_NORMS, WeightNorm, effective_sample_size, exp_weighted_loss
from recpost.methods.next_item import NextItemModule


class ExpSFT(NextItemModule):
    """Cross-entropy of the logged next item weighted by ``exp(reward / lam)``.

    Args:
        lam: temperature lambda > 0 (on the reward scale; see the module docstring).
        weight_norm: ``batch_mean`` (weights divided by their batch mean; default, stable for any
            ``lam``) or ``none`` (the raw weights).
        max_weight: clip weights (after normalisation) at this value; ``null`` = no clip.
        **kwargs: the shared settings of ``NextItemModule`` (softmax: full | sampled, ...) and ``RecModule``
            (backbone, lr, init_from, ...). With a sampled softmax the weights multiply each target's
            sampled cross-entropy, so ``lam -> inf`` is SFT with the same sampled softmax.
    """

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        finite_positive("lam", s["lam"], "try 0.25-4 on 1..5-star rewards")
        one_of("weight_norm", s["weight_norm"], WEIGHT_NORMS)
        optional(positive, "max_weight", s["max_weight"])
        super().check_settings(**settings)

    def __init__(
        self,
        *args,
        lam: float = 1.0,
        weight_norm: WeightNorm = "batch_mean",
        max_weight: float | None = None,
        **kwargs,
    ) -> None:
        self.check_settings_once(dict(lam=lam, weight_norm=weight_norm, max_weight=max_weight, **kwargs))
        super().__init__(*args, **kwargs)

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce, rewards = self.next_item_cross_entropy(batch)  # [N], [N]
        loss, weights = exp_weighted_loss(ce, rewards, self.hparams.lam, self.hparams.weight_norm, self.hparams.max_weight)
        with torch.no_grad():
            weighted = weights * ce
            logs = {
                "weight_min": weights.min(), "weight_mean": weights.mean(), "weight_max": weights.max(),
                "ess": effective_sample_size(weights), "ce": ce.mean(),
            }
            liked = batch["next_liked"][batch["next_items"] > 0]  # [N]
            logs["liked_loss_share"] = weighted[liked].sum() / weighted.sum().clamp_min(1e-12)
        return loss, logs
