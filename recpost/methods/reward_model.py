"""Reward model: predicts the rating a user would give an item after their history.

The learned reward that PPO maximises and that ranks DPO's pairs. Its head starts as the classic
damped *baseline predictor* (Koren, 2008) and learns the rest from the backbone's state::

    r(s_t, i) = b + b_i + a * m_t + v . h_t + (W_h h_t + W_g g_t) . e_i

- ``b``: global mean rating, ``b_i``: item bias, both set from the training ratings at the start of
  fit (item deviations shrunk by ``prior_count``);
- ``m_t``: the user's mean deviation ``r - b - b_i`` over the items of the history up to ``t``, shrunk
  by ``prior_count``; ``a`` starts at 1, so the untrained head *is* the baseline predictor;
- ``h_t``: the backbone's hidden state (the backbone is fine-tuned), ``e_i``: its item embeddings;
- ``g_t``: the history's items weighted by those deviations (what the user liked and disliked), shrunk
  the same way; ``v``, ``W_h``, ``W_g`` start at 0.

Scoring the whole catalog is one ``[B, d] @ [d, V + 1]`` matmul (``predict_rewards``). The RM predicts
ratings on the source's scale (stars), whatever ``data.reward_transform``: its RMSE is comparable with
the literature, and PPO/DPO use it as their reward. Trained by MSE at every position of the training
windows, from the pretrained checkpoint (``init_from``).

Evaluation: ``rmse``, ``mae`` of the held-out target's rating next to the global-mean, item-mean and
user-mean baselines (``rmse_global_mean``, ... from training interactions only), plus the ranking
metrics of the RM used as a policy (recommend the highest predicted ratings). Select its checkpoint on
``val/rmse`` (``configs/method/reward_model.yaml`` sets ``checkpoint.monitor: val/rmse``, mode min).
"""

from __future__ import annotations

import contextvars
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recpost.errors import RecpostError
from recpost.evaluation import RankingMetrics, ScoreColumns
from recpost.methods.base import RecModule, read_checkpoint
from recpost.methods.policy import freeze
from recpost.models import BackboneConfig, mask_padding_column

# Training part of a user's sequence: offsets[u] : offsets[u + 1] - HELD_OUT (validation and test targets).
HELD_OUT = 2
# Per-user squared / absolute errors accumulated in evaluation; RMSE is the root of their mean.
PREDICTORS = ("", "_global_mean", "_item_mean", "_user_mean")


def training_part(offsets: np.ndarray, held_out: int = HELD_OUT) -> tuple[np.ndarray, np.ndarray]:
    """``(in_train [N] bool, user [N])`` for CSR sequences: the interactions before each user's last
    ``held_out`` (the validation and test targets), and the user of every interaction."""
    n = int(offsets[-1])
    start, end = offsets[:-1], np.maximum(offsets[1:] - held_out, offsets[:-1])
    mark = np.zeros(n + 1, dtype=np.int64)
    np.add.at(mark, start, 1)
    np.add.at(mark, end, -1)
    user = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return np.cumsum(mark)[:-1] > 0, user


def rating_baselines(item: np.ndarray, rating: np.ndarray, offsets: np.ndarray, n_items: int, held_out: int = HELD_OUT):
    """Global, per-item and per-user mean ratings over the training interactions of CSR sequences.

    Returns ``(global_mean, item_mean [n_items + 1], user_mean [n_users])``; an item without training
    ratings gets the global mean (so does a user without any, which leave-one-out splits never have).
    """
    in_train, user = training_part(offsets, held_out)
    items, users, ratings = item[in_train], user[in_train], rating[in_train].astype(np.float64)
    n_users = len(offsets) - 1
    global_mean = float(ratings.mean()) if len(ratings) else 0.0
    i_sum = np.bincount(items, weights=ratings, minlength=n_items + 1)
    i_cnt = np.bincount(items, minlength=n_items + 1)
    u_sum = np.bincount(users, weights=ratings, minlength=n_users)
    u_cnt = np.bincount(users, minlength=n_users)
    item_mean = np.where(i_cnt > 0, i_sum / np.maximum(i_cnt, 1), global_mean)
    user_mean = np.where(u_cnt > 0, u_sum / np.maximum(u_cnt, 1), global_mean)
    return global_mean, item_mean, user_mean


class RatingHead(nn.Module):
    """``r(s_t, i)`` of the module docstring; ``prior_count`` shrinks item and user deviations."""

    def __init__(self, n_items: int, d_model: int, prior_count: float) -> None:
        super().__init__()
        self.prior_count = prior_count
        self.bias = nn.Parameter(torch.zeros(()))
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1))
        self.user_weight = nn.Parameter(torch.ones(()))
        self.state_bias = nn.Linear(d_model, 1, bias=False)
        self.query_state = nn.Linear(d_model, d_model, bias=False)
        self.query_taste = nn.Linear(d_model, d_model, bias=False)
        for layer in (self.state_bias, self.query_state, self.query_taste):
            nn.init.zeros_(layer.weight)
        # Set once from the training data at the start of the first fit (then saved in checkpoints).
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def init_biases(self, global_mean: float, item_sum: torch.Tensor, item_count: torch.Tensor) -> None:
        """``b`` = training mean, ``b_i`` = shrunk mean deviation of the item's training ratings."""
        self.bias.fill_(global_mean)
        dev = (item_sum - item_count * global_mean) / (item_count + self.prior_count)
        self.item_bias.copy_(dev.to(self.item_bias))
        self.item_bias[0] = 0.0
        self.initialized.fill_(True)

    def state(self, hidden: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, item_emb: torch.Tensor):
        """Per-position state terms: ``offset [B, L]`` (``b + a m_t + v.h_t``) and ``query [B, L, d]``."""
        valid = (items > 0).float()  # [B, L]
        # Deviation of each past rating from what b + b_i predicts; no gradient into the biases from here.
        dev = (ratings.float() - self.bias.detach() - self.item_bias.detach()[items]) * valid  # [B, L]
        denom = valid.cumsum(1) + self.prior_count  # [B, L]
        user_dev = dev.cumsum(1) / denom  # m_t
        taste = (dev.unsqueeze(-1) * item_emb[items]).cumsum(1) / denom.unsqueeze(-1)  # g_t [B, L, d]
        offset = self.bias + self.user_weight * user_dev + self.state_bias(hidden).squeeze(-1)
        query = self.query_state(hidden) + self.query_taste(taste)
        return offset, query

    def forward(self, offset: torch.Tensor, query: torch.Tensor, item_emb: torch.Tensor, items: torch.Tensor | None = None):
        """Predicted ratings: for ``items [..., K]`` -> ``[..., K]``, else the catalog ``[..., V + 1]``."""
        if items is not None:
            return offset.unsqueeze(-1) + self.item_bias[items] + (item_emb[items] * query.unsqueeze(-2)).sum(-1)
        return self.score_columns(offset, query, item_emb, slice(None))

    def score_columns(
        self, offset: torch.Tensor, query: torch.Tensor, item_emb: torch.Tensor, columns: slice | torch.Tensor
    ) -> torch.Tensor:
        """Predicted ratings of the same items for every row in one matmul: ``columns`` is a slice of the
        catalog's ``V + 1`` columns or item ids ``[K]`` -> ``[..., K]`` (padding is not masked here)."""
        return offset.unsqueeze(-1) + self.item_bias[columns] + query @ item_emb[columns].T


class RewardModel(RecModule):
    """Rating regression on the backbone's state; ``predict_rewards`` scores the catalog for PPO/DPO.

    Args:
        prior_count: pseudo-count that shrinks item and user mean deviations toward the global mean
            (an item rated n times keeps ``n / (n + prior_count)`` of its deviation).
        **kwargs: the shared settings of ``RecModule`` (backbone, lr, init_from, ...).
    """

    def __init__(self, *args, prior_count: float = 5.0, **kwargs) -> None:
        if not prior_count >= 0:
            raise RecpostError(f"model.prior_count must be >= 0 (got {prior_count})")
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("prior_count")
        self.head = RatingHead(self.hparams.n_items, self.backbone.item_weights().shape[1], prior_count)
        self._baselines: tuple | None = None

    # ----------------------------------------------------------------------------------- prediction
    def _states(self, items: torch.Tensor, ratings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.backbone.encode(items, ratings).float()  # [B, L, d]
        item_emb = self.backbone.item_weights().float()  # [V + 1, d]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            offset, query = self.head.state(hidden, items, ratings, item_emb)
        return offset, query, item_emb

    def predict_rewards(
        self, input_items: torch.Tensor, input_ratings: torch.Tensor, candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted ratings after each history ``input_items [B, L]`` (with their ``input_ratings``):
        of every item ``[B, n_items + 1]`` (column 0 is padding: meaningless), or of ``candidates [B, K]``."""
        offset, query, item_emb = self._states(input_items, input_ratings)
        with torch.autocast(device_type=offset.device.type, enabled=False):
            return self.head(offset[:, -1], query[:, -1], item_emb, candidates)

    def rewards_at(self, input_items: torch.Tensor, input_ratings: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of every item at the ``states [B, L]`` (bool) positions -> ``[N, n_items + 1]``."""
        offset, query, item_emb = self._states(input_items, input_ratings)
        with torch.autocast(device_type=offset.device.type, enabled=False):
            return self.head(offset[states], query[states], item_emb)

    # ----------------------------------------------------------------------------------- training
    def init_biases_from(self, item: np.ndarray, rating: np.ndarray, offsets: np.ndarray) -> None:
        """Start the head at the damped baseline predictor of these sequences' training ratings."""
        in_train, _ = training_part(offsets)
        items, ratings = item[in_train], rating[in_train].astype(np.float64)
        n = self.hparams.n_items + 1
        item_sum = torch.from_numpy(np.bincount(items, weights=ratings, minlength=n))
        item_count = torch.from_numpy(np.bincount(items, minlength=n)).double()
        self.head.init_biases(float(ratings.mean()), item_sum, item_count)

    def on_fit_start(self) -> None:
        if not bool(self.head.initialized):  # a restored checkpoint already has its biases
            d = self.trainer.datamodule.data
            self.init_biases_from(d.item, d.rating, d.offsets)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        offset, query, item_emb = self._states(batch["input_items"], batch["input_ratings"])
        has_target = batch["target_items"] > 0  # [B, L]
        targets = batch["target_items"][has_target]  # [N]
        with torch.autocast(device_type=offset.device.type, enabled=False):
            pred = self.head(offset[has_target], query[has_target], item_emb, targets[:, None]).squeeze(-1)  # [N]
        mse = ((pred - batch["target_ratings"][has_target].float()) ** 2).mean()
        return mse, {"rmse": mse.detach().sqrt()}

    # ----------------------------------------------------------------------------------- evaluation
    def catalog_scorer(self, batch: dict[str, torch.Tensor]) -> ScoreColumns:
        """The RM as a policy: predicted ratings of catalog columns after each history (padding -inf);
        evaluation masks the user's history (``catalog_scores`` or ``score_chunk_size`` chunks)."""
        offset, query, item_emb = self._states(batch["input_items"], batch["input_ratings"])
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
            g, item_mean, user_mean = rating_baselines(data.item, data.rating, data.offsets, self.hparams.n_items)
            self._baselines = (data, torch.tensor(g), torch.from_numpy(item_mean).float(), torch.from_numpy(user_mean).float())
        return tuple(t.to(self.device) for t in self._baselines[1:])

    def extra_metric_names(self) -> tuple[str, ...]:
        return super().extra_metric_names() + tuple(f"{e}{p}" for e in ("sq_err", "abs_err") for p in PREDICTORS)

    def extra_metrics(self, batch: dict[str, torch.Tensor], scores: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().extra_metrics(batch, scores)
        target = batch["target_item"]
        g, item_mean, user_mean = self._rating_baselines()
        predictions = {
            "": self.predict_rewards(batch["input_items"], batch["input_ratings"], target[:, None]).squeeze(-1),
            "_global_mean": g.expand_as(target).float(),
            "_item_mean": item_mean[target],
            "_user_mean": user_mean[batch["user_index"]],
        }
        for name, pred in predictions.items():
            err = pred.float() - batch["target_rating"].float()
            out[f"sq_err{name}"], out[f"abs_err{name}"] = err**2, err.abs()
        return out

    def _log_metrics(self, metrics: RankingMetrics, prefix: str) -> dict[str, float]:
        values = metrics.compute()
        for p in PREDICTORS:
            values[f"rmse{p}"] = math.sqrt(values.pop(f"sq_err{p}"))
            values[f"mae{p}"] = values.pop(f"abs_err{p}")
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, sync_dist=False)
        return values


def load_reward_model(path: str, item_map_hash: str, what: str = "model.reward_model") -> RewardModel:
    """A frozen ``RewardModel`` rebuilt from its checkpoint (architecture from its hyperparameters).

    One-line ``RecpostError`` when the file is missing, is not a reward-model checkpoint, or was trained
    on another item catalog than ``item_map_hash``.
    """
    how = "a reward model is needed: train one with `recpost fit --config <pretrain.yaml> --config configs/method/reward_model.yaml` and pass its best.ckpt"
    ckpt_path = Path(path).expanduser()
    ckpt = read_checkpoint(path, what, how)
    hp, state = ckpt.get("hyper_parameters", {}), ckpt.get("state_dict", {})
    if not any(k.startswith("head.") for k in state) or "prior_count" not in hp:
        raise RecpostError(f"{what}: {ckpt_path} is not a reward-model checkpoint (no rating head); {how}")
    backbone = hp.get("backbone") or BackboneConfig()
    backbone = BackboneConfig(**backbone) if isinstance(backbone, dict) else backbone
    # Built in a fresh context: inside LightningCLI's instantiation of the method, Lightning's
    # save_hyperparameters would otherwise record the method's arguments instead of the RM's.
    model = contextvars.Context().run(
        RewardModel, n_items=hp["n_items"], item_map_hash=item_map_hash, max_len=hp["max_len"], backbone=backbone,
        prior_count=hp["prior_count"],
    )
    model._check_catalog(hp, f"{what}: {ckpt_path}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RecpostError(f"{what}: {ckpt_path} does not match its own hyperparameters ({str(exc).splitlines()[0]})") from None
    return freeze(model)
