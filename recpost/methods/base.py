"""``RecModule``: what every post-training method shares.

It owns the backbone, the optimiser and learning-rate schedule, starting from a checkpoint
(``init_from``), the item-catalog check, frozen helper modules (reward models, a reference policy),
and the whole evaluation (whole-catalog scores, or ``score_chunk_size`` items at a time for large
catalogs). A method subclasses it (or ``NextItemModule`` / ``PolicyModule``) and defines only
``training_loss`` and, if it needs them, its own diagnostics. See ``docs/architecture.md``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch import nn

from recpost.core.batch import EvalBatch, TrainBatch
from recpost.models.checkpoint import check_catalog, load_backbone_weights, load_judge, load_reward_model, stamp, verify_weights
from recpost.core.errors import RecpostError
from recpost.evaluation import (
    TOP_K, CatalogRanking, RankingMetrics, ScoreColumns, judge_metric_names, judge_spread, judge_values, mask_items,
    rank_in_chunks,
)
from recpost.methods.checks import at_least, check_judges, optional, positive
from recpost.models import BackboneConfig, RatingModel, build_backbone, freeze

# Evaluation metrics are computed by torchmetrics objects that already synchronise across ranks in
# compute(); logging their (identical) values without sync_dist is intended.
warnings.filterwarnings("ignore", message=".*sync_dist=True.*")

# Frozen reward models a method may hold -> the per-user evaluation metric each one adds.
REWARD_MODEL_METRICS = {"reward_model": "rm_reward@10", "eval_reward_model": "eval_rm_reward@10"}
RM_TOP_K = TOP_K


def check_finite(loss: torch.Tensor, step: int, hint: str) -> None:
    """Stop with one line when a training loss is NaN or infinite (``hint``: which setting to change)."""
    if not torch.isfinite(loss):
        raise RecpostError(f"training loss became {loss.item()} at step {step}; {hint}")


class RecModule(L.LightningModule):
    """Shared base of every method.

    Args:
        n_items: catalog size; linked from ``data.n_items``.
        item_map_hash: identifies the catalog; linked from the data, stored in every checkpoint.
        max_len: longest history; linked from ``data.max_len``.
        backbone: the sequence encoder's architecture.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up (optimiser steps).
        lr_schedule: ``constant`` after warm-up, or ``cosine`` decay to 0 over the run's optimiser steps.
        mask_history: rank only items the user has not had yet (off: compare with libraries that do
            not mask, such as RecBole's sequential models).
        init_from: checkpoint to start from (weights only, ``weights_only=True``); its catalog must
            match the data's.
        eval_reward_model: a RewardModel checkpoint used only for evaluation: logs
            ``eval_rm_reward@10``, its mean predicted rating of the policy's top-10 (a second, independent
            RM shows whether a method hacks the RM it was trained against).
        judges: RewardModel (or MFRewardModel) checkpoints used only for evaluation, judges trained
            independently of any reward model the method trains against: logs ``judge_reward@10`` (the
            judges' mean predicted rating of the top-10), each judge's ``judge<k>_reward@10`` and, for 2 or
            more, ``judge_reward@10_std``; see ``recpost.evaluation.judges``.
        judge_reference: the RewardModel checkpoint the methods train against, used only for evaluation
            with ``judges``: logs each judge's agreement with it on the policy's top-10
            (``judge<k>_rank_corr@10``) and on its own top-10 of the catalog (``judge<k>_rm_overlap@10``).
        score_chunk_size: in evaluation and prediction, score the catalog this many items at a time,
            so memory stays at ``[eval_batch_size, score_chunk_size]`` scores instead of
            ``[eval_batch_size, n_items + 1]``; the metrics are the same. ``null``: one matmul over the
            whole catalog. Worth it from ~10^5 items (e.g. 65536).
    """

    #: Whether the method has a ``reward_model`` argument (the experiment runner passes it the study's RM).
    takes_reward_model: ClassVar[bool] = False
    #: Prefix of the training diagnostics in the logs (``train/``; TRL's names for the RLHF methods: none).
    log_prefix: ClassVar[str] = "train/"
    #: Which setting to change when the training loss stops being finite.
    divergence_hint: ClassVar[str] = "lower model.lr or check the rewards"

    @classmethod
    def needs_reward_model(cls, init_args: Mapping[str, Any]) -> bool:
        """Whether the method, configured with ``init_args`` (its config's ``model.init_args`` with a grid
        setting on top), cannot train without a reward model."""
        return False

    @classmethod
    def setting_defaults(cls) -> dict[str, Any]:
        """Every setting the method takes, with its default: the keyword arguments of ``__init__`` along the
        class hierarchy (a subclass's default wins). The experiment runner checks grid keys against it."""
        defaults: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or not issubclass(klass, RecModule):
                continue
            for name, param in inspect.signature(init).parameters.items():
                if name != "self" and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                    defaults[name] = None if param.default is param.empty else param.default
        return defaults

    @classmethod
    def check_settings(cls, **settings: Any) -> None:
        """Raise one ``RecpostError`` line on the first setting that breaks a rule; settings not given take
        their defaults. ``__init__`` calls it before anything is built or loaded, and ``recpost experiment``
        calls it for every stage (config plus grid point) before the first stage runs, so a bad value
        costs no pretraining. A method checks its own settings, then calls ``super().check_settings``."""
        s = {**cls.setting_defaults(), **settings}
        positive("lr", s["lr"], "e.g. 0.001")
        optional(at_least, "score_chunk_size", s["score_chunk_size"], 1,
                 hint="e.g. 65536, or null to score the whole catalog at once")
        check_judges(s)

    def check_settings_once(self, settings: Mapping[str, Any]) -> None:
        """``check_settings`` of this object's class, from the first ``__init__`` that runs: the most derived
        one, which is given every setting (the bases' ``__init__`` see only part of them)."""
        if not self.__dict__.get("_settings_checked"):
            self.__dict__["_settings_checked"] = True
            type(self).check_settings(**settings)

    def __init__(
        self,
        n_items: int = 0,
        item_map_hash: str = "",
        max_len: int = 50,
        backbone: BackboneConfig | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        mask_history: bool = True,
        init_from: str | None = None,
        eval_reward_model: str | None = None,
        judges: list[str] | None = None,
        judge_reference: str | None = None,
        score_chunk_size: int | None = None,
    ) -> None:
        self.check_settings_once(dict(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                      lr_schedule=lr_schedule, mask_history=mask_history, init_from=init_from,
                                      eval_reward_model=eval_reward_model, judges=judges,
                                      judge_reference=judge_reference, score_chunk_size=score_chunk_size))
        super().__init__()
        if n_items < 1:  # the data link, not a setting: checked here, where the linked value arrives
            raise RecpostError("model.n_items must be >= 1; it is linked from the data module (data.n_items)")
        backbone = backbone or BackboneConfig()
        # Records every argument of the subclasses' __init__ too (Lightning walks the constructor frames).
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, n_items=n_items, max_len=max_len)
        self.val_metrics = RankingMetrics(n_items)
        self.test_metrics = RankingMetrics(n_items)
        self._metrics_ready = False
        self._truth = None
        # Frozen modules (reference policy, reward models) live outside the module tree: no optimiser,
        # no state_dict (rebuilt from their own checkpoints), never in train mode; `_apply` moves them.
        self._frozen: dict[str, nn.Module] = {}
        if init_from:
            load_backbone_weights(self.backbone, init_from, item_map_hash, "model.init_from")
        if eval_reward_model:
            self.hold_frozen("eval_reward_model", self.load_reward_model(eval_reward_model, "model.eval_reward_model"))
        for k, path in enumerate(judges or []):
            self.hold_frozen(f"judge.{k}", load_judge(path, item_map_hash, f"model.judges[{k}]"))
        if judge_reference and judges:
            self.hold_frozen("judge_reference", self.load_reward_model(judge_reference, "model.judge_reference"))

    # ----------------------------------------------------------------------------------- weights
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Stamp every checkpoint Lightning writes with the hash of its weights (checked at every load)."""
        stamp(checkpoint, f"{type(self).__module__}.{type(self).__qualname__}")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The gate for checkpoints Lightning loads (``--ckpt_path``, which the CLI also checks before
        Lightning opens the file): weights unchanged since saving, and this catalog."""
        verify_weights(checkpoint, "the checkpoint", warn=False)
        check_catalog(checkpoint.get("hyper_parameters", {}), self.hparams.item_map_hash, "the checkpoint")

    def load_reward_model(self, path: str, what: str) -> RatingModel:
        """A frozen reward model (``RatingModel``) from a RewardModel checkpoint of this catalog."""
        return load_reward_model(path, item_map_hash=self.hparams.item_map_hash, what=what)

    def hold_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Keep ``module`` frozen beside this one (moved with it, never trained, never saved)."""
        self._frozen[name] = freeze(module)
        return module

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for module in self.__dict__.get("_frozen", {}).values():
            module._apply(fn, *args, **kwargs)
        return self

    # ----------------------------------------------------------------------------------- training
    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's loss and any diagnostics to log (under ``log_prefix``). Subclasses define it."""
        raise RecpostError(f"{type(self).__name__} is a base class; use a method such as recpost.methods.SFT")

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        loss, logs = self.training_loss(batch)
        check_finite(loss, self.global_step, self.divergence_hint)
        self.log_training(loss, logs, batch)
        return loss

    def log_training(self, loss: torch.Tensor, logs: Mapping[str, torch.Tensor], batch: TrainBatch) -> None:
        """``train/loss`` and the method's diagnostics (under ``log_prefix``), per batch of windows."""
        batch_size = batch["input_items"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if logs:
            self.log_dict({f"{self.log_prefix}{k}": v for k, v in logs.items()}, batch_size=batch_size)

    def optimizer_steps_per_batch(self) -> int:
        """Optimiser steps a training batch takes (1; PPO takes several per rollout)."""
        return 1

    def total_optimizer_steps(self) -> int:
        """Optimiser steps of the whole fit: the training batches Lightning will run times
        ``optimizer_steps_per_batch``, capped by ``trainer.max_steps`` (which counts optimiser steps)."""
        trainer = self.trainer
        if trainer.max_epochs == -1 or trainer.max_epochs is None:
            batches = math.inf
        else:
            if trainer.train_dataloader is None:
                trainer.fit_loop.setup_data()
            batches = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        steps = batches * self.optimizer_steps_per_batch()
        if trainer.max_steps != -1:
            steps = min(steps, trainer.max_steps)
        if math.isinf(steps):
            raise RecpostError("lr_schedule: cosine needs a finite run: set trainer.max_epochs or trainer.max_steps")
        return max(1, int(steps))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        if self.hparams.lr_schedule == "constant" and warmup == 0:
            return opt
        total = self.total_optimizer_steps() if self.hparams.lr_schedule == "cosine" else 1

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if self.hparams.lr_schedule == "cosine":
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------------------------- evaluation
    def _ground_truth(self):
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "ground_truth", None) if datamodule is not None else None

    def _reset_metrics(self) -> None:
        """(Re)build the metric objects with the ground-truth metric names of this data, if any."""
        truth = self._ground_truth()
        extra = (tuple(truth.metric_names) if truth is not None else ()) + self.extra_metric_names()
        if not self._metrics_ready or self.val_metrics.extra != extra:
            self.val_metrics = RankingMetrics(self.hparams.n_items, extra=extra).to(self.device)
            self.test_metrics = RankingMetrics(self.hparams.n_items, extra=extra).to(self.device)
            self._truth = truth
            self._metrics_ready = True

    def catalog_scorer(self, batch: EvalBatch) -> ScoreColumns:
        """Encode each history once; returns ``columns -> [B, K]`` fp32 scores of those catalog columns
        (a slice, or item ids ``[K]``) for the next step, unmasked except padding (-inf)."""
        hidden = self.backbone.encode(batch["input_items"], batch.get("input_ratings"),
                                      batch.get("input_timestamps"))[:, -1]  # [B, d]
        return lambda columns: self.backbone.score_columns(hidden, columns)

    def catalog_scores(self, batch: EvalBatch) -> torch.Tensor:
        """fp32 scores of every item for the next step after each history ``[B, n_items + 1]``;
        items of the history masked unless ``mask_history`` is off (padding always masked)."""
        scores = self.catalog_scorer(batch)(slice(None))  # [B, V + 1], fp32
        if self.hparams.mask_history:
            mask_items(scores, batch["history_items"])
        return scores

    def rank_catalog(self, batch: EvalBatch, k: int = TOP_K) -> CatalogRanking:
        """Top-``k`` items and the target's rank (if the batch has one) from ``score_chunk_size`` items at a
        time (the masking of ``catalog_scores``)."""
        return rank_in_chunks(
            self.catalog_scorer(batch), self.hparams.n_items + 1, self.hparams.score_chunk_size,
            target=batch.get("target_item"), history=batch["history_items"] if self.hparams.mask_history else None, k=k,
        )

    @property
    def judges(self) -> list[nn.Module]:
        """The frozen judges of ``judges`` (empty without any)."""
        return [self._frozen[f"judge.{k}"] for k in range(len(self.hparams.get("judges") or []))]

    def extra_metric_names(self) -> tuple[str, ...]:
        """Names of the per-user values ``extra_metrics`` adds to the evaluation (averaged over users)."""
        held = tuple(metric for name, metric in REWARD_MODEL_METRICS.items() if name in self._frozen)
        return held + judge_metric_names(len(self.judges), agreement="judge_reference" in self._frozen)

    def extra_metrics(
        self, batch: EvalBatch, scores: torch.Tensor | CatalogRanking
    ) -> dict[str, torch.Tensor]:
        """Per-user values ``name -> [B]`` for ``scores [B, n_items + 1]`` (masked) or their ``CatalogRanking``:
        here the mean predicted rating of the top-10 under each reward model held (``rm_reward@10``,
        ``eval_rm_reward@10``) and under each judge (``judge_reward@10``: their mean), and with
        ``judge_reference`` the judges' agreement with it (``recpost.evaluation.judges``)."""
        out = {}
        held = [(name, metric) for name, metric in REWARD_MODEL_METRICS.items() if name in self._frozen]
        judges = self.judges
        if held or judges:
            ranking = scores if isinstance(scores, CatalogRanking) else CatalogRanking.from_scores(scores, k=RM_TOP_K)
            top = ranking.top_items[:, :RM_TOP_K]  # [B, 10]

            def top_rating(model: RatingModel) -> torch.Tensor:  # [B]: the model's mean rating of the top 10
                rewards = model.predict_rewards(batch["input_items"], batch["input_ratings"], top,
                                                batch.get("input_timestamps"))  # [B, 10]
                return rewards.float().mean(dim=-1)

            for name, metric in held:
                out[metric] = top_rating(self._frozen[name])
            if judges:  # their ratings of the top 10 and, with the training RM, their agreement with it
                out.update(judge_values(judges, batch, top, self._frozen.get("judge_reference"), self.hparams.n_items + 1,
                                        self.hparams.score_chunk_size, batch["history_items"] if self.hparams.mask_history else None))
        return out

    def _ground_truth_metrics(self, batch: EvalBatch, scores: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The data's ground-truth metrics (the simulator's ``true_reward@10``, ...), which need each user's
        whole score row: without ``scores`` (chunked evaluation) they get a few users' rows at a time."""
        if self._truth is None:
            return {}
        if scores is not None:
            return self._truth.evaluate(batch, scores)
        n_users = batch["user_index"].shape[0]
        rows = max(1, self.hparams.score_chunk_size // (self.hparams.n_items + 1))
        parts = []
        for start in range(0, n_users, rows):
            part = {key: value[start:start + rows] for key, value in batch.items()}
            parts.append(self._truth.evaluate(part, self.catalog_scores(part)))
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def _eval_step(self, batch: EvalBatch, metrics: RankingMetrics) -> None:
        if self.hparams.score_chunk_size is None:
            scores = self.catalog_scores(batch)  # [B, V + 1]
            ranking = CatalogRanking.from_scores(scores, batch["target_item"])
        else:
            scores, ranking = None, self.rank_catalog(batch)  # never [B, V + 1] at once
        extra = self._ground_truth_metrics(batch, scores)
        extra.update(self.extra_metrics(batch, ranking))
        metrics.update(ranking, batch["target_item"], batch["target_rating"], batch["target_liked"], batch["user_index"], extra)

    def derived_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """The logged metrics from the metric object's means over users: here, those plus the spread
        across judges (``judge_reward@10_std``). A method with metrics that are not means over users
        (a reward model's RMSE) derives them here."""
        return {**values, **judge_spread(values, len(self.judges))}

    def _log_metrics(self, metrics: RankingMetrics, prefix: str) -> dict[str, float]:
        values = self.derived_metrics(metrics.compute())
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, sync_dist=False)
        return values

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics()
        self.val_metrics.reset()

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:
        self._reset_metrics()
        self.test_metrics.reset()

    def test_step(self, batch: EvalBatch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")
        with self.test_metrics.sync_context():  # every rank's rows (compute() un-syncs after itself)
            rows = self.test_metrics.per_user()
        values = RankingMetrics.per_user_metrics(rows["rank"], self.test_metrics.ks)
        self.test_per_user = {"user_index": rows["user_index"], **values,
                              **{name: rows[name] for name in self.test_metrics.extra}}
        self.test_metrics.reset()

    def predict_step(self, batch: EvalBatch, batch_idx: int, k: int = 10) -> dict[str, torch.Tensor]:
        """Top-k unseen items for each user after their whole sequence."""
        if self.hparams.score_chunk_size is None:
            top = CatalogRanking.from_scores(self.catalog_scores(batch), k=k)
        else:
            top = self.rank_catalog(batch, k=k)
        return {"user_index": batch["user_index"], "items": top.top_items, "scores": top.top_scores}
