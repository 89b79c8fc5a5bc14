"""``RatingModule``: what the rating models share (the sequence ``RewardModel`` and the matrix-factorisation
``MFRewardModel``): their evaluation, so both report the same numbers the same way.

Evaluation: ``rmse``, ``mae`` and ``bias`` (mean signed error) of the held-out target's rating next to
the global-mean, item-mean and user-mean baselines (``rmse_global_mean``, ... from training interactions
only), the per-user signed error ``err`` (in ``test_per_user.csv``: two rating models that err alike on the
same users are not independent judges of each other), plus the ranking metrics of the model used as a
policy (recommend the highest predicted ratings). A subclass gives its component as ``rating_model`` (an
``nn.Module`` with ``predict_rewards`` and ``column_scorer``) and its training loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from recpost.core.batch import EvalBatch
from recpost.core.errors import RecpostError
from recpost.evaluation import ScoreColumns
from recpost.methods.base import RecModule

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


class RatingModule(RecModule):
    """Shared base of the rating models: the evaluation of the module docstring."""

    _baselines: tuple | None = None

    @property
    def rating_model(self) -> torch.nn.Module:
        """The component being trained (``predict_rewards``, ``column_scorer``). Subclasses define it."""
        raise NotImplementedError

    def predict_rewards(self, input_items: torch.Tensor, input_ratings: torch.Tensor,
                        candidates: torch.Tensor | None = None, input_timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """``predict_rewards`` of the model being trained."""
        return self.rating_model.predict_rewards(input_items, input_ratings, candidates, input_timestamps)

    def catalog_scorer(self, batch: EvalBatch) -> ScoreColumns:
        """The model as a policy: predicted ratings of catalog columns after each history (padding -inf);
        evaluation masks the user's history (``catalog_scores`` or ``score_chunk_size`` chunks)."""
        return self.rating_model.column_scorer(batch["input_items"], batch["input_ratings"], batch.get("input_timestamps"))

    def _rating_baselines(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise RecpostError(f"{type(self).__name__} evaluation needs the RecDataModule: "
                               "trainer.validate(model, datamodule=dm)")
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
