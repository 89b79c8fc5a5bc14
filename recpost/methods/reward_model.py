"""``RewardModel``: trains the reward-model component (``recpost.models.RatingModel``: the backbone
and a rating head, see ``recpost/models/reward.py`` for the head's formula) to predict the rating of
the logged next item, by MSE at every position of the training windows, from the pretrained
checkpoint (``init_from``).

PPO and DPO use the trained component frozen (``recpost.models.checkpoint.load_reward_model``) as their
reward; any method can be scored by one at evaluation (``eval_reward_model``). The RM predicts
ratings on the source's scale (stars), whatever ``data.reward_transform``: its RMSE is comparable
with the literature.

Evaluation: ``rmse``, ``mae`` and ``bias`` (mean signed error) of the held-out target's rating next to
the global-mean, item-mean and user-mean baselines (``rmse_global_mean``, ... from training interactions only), plus the ranking
metrics of the RM used as a policy (recommend the highest predicted ratings). Select its checkpoint on
``val/rmse`` (``configs/method/reward_model.yaml`` sets ``checkpoint.monitor: val/rmse``, mode min).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from recpost.core.batch import EvalBatch, TrainBatch
from recpost.core.errors import RecpostError
from recpost.evaluation import ScoreColumns
from recpost.methods.base import RecModule
from recpost.methods.checks import non_negative
from recpost.models import RatingHead, RatingModel, mask_padding_column

# Per-user squared / absolute errors accumulated in evaluation; RMSE is the root of their mean.
PREDICTORS = ("", "_global_mean", "_item_mean", "_user_mean")


def rating_baselines(item: np.ndarray, rating: np.ndarray, user: np.ndarray, n_items: int, n_users: int):
    """Global, per-item and per-user mean ratings of the given (training) interactions.

    Returns ``(global_mean, item_mean [n_items + 1], user_mean [n_users])``; an item without ratings gets
    the global mean (so does a user without any, which leave-one-out splits never have).
    """
    ratings = rating.astype(np.float64)
    global_mean = float(ratings.mean()) if len(ratings) else 0.0
    i_sum = np.bincount(item, weights=ratings, minlength=n_items + 1)
    i_cnt = np.bincount(item, minlength=n_items + 1)
    u_sum = np.bincount(user, weights=ratings, minlength=n_users)
    u_cnt = np.bincount(user, minlength=n_users)
    item_mean = np.where(i_cnt > 0, i_sum / np.maximum(i_cnt, 1), global_mean)
    user_mean = np.where(u_cnt > 0, u_sum / np.maximum(u_cnt, 1), global_mean)
    return global_mean, item_mean, user_mean


class RewardModel(RecModule):
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
        self._baselines: tuple | None = None

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

    def predict_rewards(self, input_items: torch.Tensor, input_ratings: torch.Tensor,
                        candidates: torch.Tensor | None = None, input_timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """``RatingModel.predict_rewards`` of the model being trained."""
        return self.rating_model.predict_rewards(input_items, input_ratings, candidates, input_timestamps)

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

    # ----------------------------------------------------------------------------------- evaluation
    def catalog_scorer(self, batch: EvalBatch) -> ScoreColumns:
        """The RM as a policy: predicted ratings of catalog columns after each history (padding -inf);
        evaluation masks the user's history (``catalog_scores`` or ``score_chunk_size`` chunks)."""
        offset, query, item_emb = self.rating_model.states(batch["input_items"], batch["input_ratings"],
                                                           batch.get("input_timestamps"))
        offset, query = offset[:, -1], query[:, -1]  # [B], [B, d]

        def score(columns: slice | torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=offset.device.type, enabled=False):
                scores = self.head.score_columns(offset, query, item_emb, columns)  # [B, K]
            return mask_padding_column(scores, columns)

        return score

    def _rating_baselines(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise RecpostError("RewardModel evaluation needs the RecDataModule: trainer.validate(model, datamodule=dm)")
        data = datamodule.data
        if self._baselines is None or self._baselines[0] is not data:
            train = datamodule.training_interactions()
            g, item_mean, user_mean = rating_baselines(train.item, train.rating, train.user, self.hparams.n_items,
                                                       data.n_users)
            self._baselines = (data, torch.tensor(g), torch.from_numpy(item_mean).float(), torch.from_numpy(user_mean).float())
        return tuple(t.to(self.device) for t in self._baselines[1:])

    def extra_metric_names(self) -> tuple[str, ...]:
        errors = tuple(f"{e}{p}" for e in ("sq_err", "abs_err") for p in PREDICTORS)
        return super().extra_metric_names() + errors + ("err",)

    def extra_metrics(self, batch: EvalBatch, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().extra_metrics(batch, scores)
        target = batch["target_item"]
        g, item_mean, user_mean = self._rating_baselines()
        predictions = {
            "": self.predict_rewards(batch["input_items"], batch["input_ratings"], target[:, None],
                                     batch.get("input_timestamps")).squeeze(-1),
            "_global_mean": g.expand_as(target).float(),
            "_item_mean": item_mean[target],
            "_user_mean": user_mean[batch["user_index"]],
        }
        for name, pred in predictions.items():
            err = pred.float() - batch["target_rating"].float()
            out[f"sq_err{name}"], out[f"abs_err{name}"] = err**2, err.abs()
        # The model's signed error per user (in test_per_user.csv): two RMs that err alike on the same
        # users are not independent judges of each other.
        out["err"] = predictions[""].float() - batch["target_rating"].float()
        return out

    def derived_metrics(self, values: dict[str, float]) -> dict[str, float]:
        values = super().derived_metrics(values)
        for p in PREDICTORS:
            values[f"rmse{p}"] = math.sqrt(values.pop(f"sq_err{p}"))
            values[f"mae{p}"] = values.pop(f"abs_err{p}")
        values["bias"] = values.pop("err")  # mean signed error: > 0 over-predicts
        return values
