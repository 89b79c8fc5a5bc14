"""``MFRewardModel``: a matrix-factorisation rating model (``recpost.models.MFRatingModel``), trained on the
logged ratings of the training windows, as a judge that shares nothing with the sequence reward models:
no encoder, no pretrained checkpoint, no baseline-predictor initialisation.

Each training window is a user (or a slice of a long user's sequence): the user's bias and factors are the
ridge fit to the window's ratings, the item biases and factors are learned by minimising the MF objective
(``MFRatingModel.loss``). Validation and test users are scored from their history alone (their ratings before
the held-out target), so no held-out rating reaches the model. Evaluation is ``RatingModule``'s (``rmse``
next to the mean predictors, ``err`` per user, the ranking metrics of the model used as a policy); select
on ``val/rmse`` (``configs/method/mf_reward_model.yaml``).

The shared base builds a sequence backbone, which this model never uses (no gradient reaches it, so the
optimiser leaves it alone); its checkpoint stays a recpost checkpoint that every loader reads.
"""

from __future__ import annotations

import torch

from recpost.core.batch import TrainBatch
from recpost.core.errors import RecpostError
from recpost.methods.checks import at_least, non_negative
from recpost.methods.rating_base import RatingModule
from recpost.models.mf import MFRatingModel


class MFRewardModel(RatingModule):
    """Biased matrix factorisation of the ratings, the user folded in from their history.

    Args:
        rank: size of the user and item factors.
        reg: ridge weight (``reg * n_u`` on the user's bias and factors, ``reg`` per rating on an item's).
        **kwargs: the shared settings of ``RecModule`` (lr, weight_decay, ...); ``init_from`` stays null.
    """

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        at_least("rank", s["rank"], 1, "e.g. 32")
        non_negative("reg", s["reg"], "e.g. 0.15")
        if s.get("init_from"):
            raise RecpostError("model.init_from: a matrix-factorisation model has no sequence encoder to start from a "
                               "checkpoint; leave it null (it trains from scratch)")
        super().check_settings(**settings)

    def __init__(self, *args, rank: int = 32, reg: float = 0.15, **kwargs) -> None:
        self.check_settings_once(dict(rank=rank, reg=reg, **kwargs))
        super().__init__(*args, **kwargs)
        self.mf = MFRatingModel(self.hparams.n_items, rank, reg)

    @property
    def rating_model(self) -> MFRatingModel:
        return self.mf

    def on_fit_start(self) -> None:
        if not bool(self.mf.initialized):  # a restored checkpoint already has its global bias
            train = self.trainer.datamodule.training_interactions()
            self.mf.init_bias(float((train.rating * train.weight).sum() / train.weight.sum()))

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        objective, mse = self.mf.loss(batch["next_items"], batch["next_ratings"])  # each window's targets
        return objective, {"rmse": mse.detach().sqrt()}
