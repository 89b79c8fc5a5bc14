"""``RecModule``: what every post-training method shares.

It owns the backbone, the optimiser and schedule, starting from a checkpoint (``init_from``), the
item-catalog check, and the whole evaluation (whole-catalog scores, or ``score_chunk_size`` items at a
time for large catalogs). A method subclasses it and defines only ``training_loss`` (and, if it needs
them, its own diagnostics). ``NextItemModule`` adds what the next-item cross-entropy methods (SFT,
ExpSFT) share: the full softmax over the catalog or a sampled softmax.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recpost.errors import RecpostError
from recpost.evaluation import TOP_K, CatalogRanking, RankingMetrics, ScoreColumns, mask_items, rank_in_chunks
from recpost.methods.losses import popularity_log_q, sample_negatives, sampled_softmax_cross_entropy, sampling_log_q
from recpost.methods.policy import freeze
from recpost.models import BackboneConfig, build_backbone

# Evaluation metrics are computed by torchmetrics objects that already synchronise across ranks in
# compute(); logging their (identical) values without sync_dist is intended.
warnings.filterwarnings("ignore", message=".*sync_dist=True.*")

# Frozen reward models a method may hold -> the per-user evaluation metric each one adds.
REWARD_MODEL_METRICS = {"reward_model": "rm_reward@10", "eval_reward_model": "eval_rm_reward@10"}
RM_TOP_K = TOP_K


def read_checkpoint(path: str, what: str, how: str) -> dict:
    """Load a checkpoint with ``weights_only=True``; one-line ``RecpostError`` if missing or unreadable.

    ``what`` names the config key (e.g. ``model.init_from``), ``how`` says how to get a good one.
    """
    ckpt_path = Path(path).expanduser()
    if not ckpt_path.is_file():
        raise RecpostError(f"{what}: checkpoint not found: {ckpt_path}; {how}")
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a recpost checkpoint"
        raise RecpostError(f"{what}: cannot load {ckpt_path} as a checkpoint ({exc})") from None


class RecModule(L.LightningModule):
    """Shared base of every method.

    Args:
        n_items: catalog size; linked from ``data.n_items``.
        item_map_hash: identifies the catalog; linked from the data, stored in every checkpoint.
        max_len: longest history; linked from ``data.max_len``.
        backbone: the sequence encoder's architecture.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up.
        lr_schedule: ``constant`` after warm-up, or ``cosine`` decay to 0 over the run.
        mask_history: rank only items the user has not had yet (off: compare with libraries that do
            not mask, such as RecBole's sequential models).
        init_from: checkpoint to start from (weights only, ``weights_only=True``); its catalog must
            match the data's.
        eval_reward_model: a RewardModel checkpoint used only for evaluation: logs
            ``eval_rm_reward@10``, its mean predicted rating of the policy's top-10 (a second, independent
            RM, e.g. another seed, shows whether a method hacks the RM it was trained against).
        score_chunk_size: in evaluation and prediction, score the catalog this many items at a time,
            so memory stays at ``[eval_batch_size, score_chunk_size]`` scores instead of
            ``[eval_batch_size, n_items + 1]``; the metrics are the same. ``null``: one matmul over the
            whole catalog. Worth it from ~10^5 items (e.g. 65536).
    """

    #: Whether the method has a ``reward_model`` argument (the experiment runner passes it the study's RM).
    takes_reward_model: ClassVar[bool] = False

    @classmethod
    def needs_reward_model(cls, init_args: Mapping[str, Any]) -> bool:
        """Whether the method, configured with ``init_args`` (its config's ``model.init_args`` with a grid
        setting on top), cannot train without a reward model."""
        return False

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
        score_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if n_items < 1:
            raise RecpostError("model.n_items must be >= 1; it is linked from the data module (data.n_items)")
        if lr <= 0:
            raise RecpostError(f"model.lr must be > 0 (got {lr})")
        if score_chunk_size is not None and not score_chunk_size >= 1:
            raise RecpostError(
                f"model.score_chunk_size must be >= 1 items or null (got {score_chunk_size}); e.g. 65536, or null to "
                "score the whole catalog at once"
            )
        backbone = backbone or BackboneConfig()
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
            self.load_weights(init_from)
        if eval_reward_model:
            self.hold_frozen("eval_reward_model", self.load_reward_model(eval_reward_model, "model.eval_reward_model"))

    # ----------------------------------------------------------------------------------- weights
    def load_weights(self, path: str) -> None:
        """Copy the backbone weights of a recpost checkpoint (any method) into this module."""
        ckpt_path = Path(path).expanduser()
        ckpt = read_checkpoint(path, "model.init_from", "pass the best.ckpt of a `recpost fit` run")
        self._check_catalog(ckpt.get("hyper_parameters", {}), ckpt_path)
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
        if not state:
            raise RecpostError(f"model.init_from: {ckpt_path} holds no backbone weights; is it a recpost checkpoint?")
        try:
            self.backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RecpostError(
                f"model.init_from: {ckpt_path} has another backbone architecture ({str(exc).splitlines()[0]}); "
                "use the same model.backbone settings as the run that wrote it"
            ) from None

    def _check_catalog(self, hparams: dict, where: Path | str) -> None:
        theirs = hparams.get("item_map_hash")
        ours = self.hparams.item_map_hash
        if theirs and ours and theirs != ours:
            raise RecpostError(
                f"{where} was trained on another item catalog (id map {theirs}, data has {ours}); use a checkpoint "
                "trained on this data set and preprocessing, or retrain"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._check_catalog(checkpoint.get("hyper_parameters", {}), "the checkpoint")

    def load_reward_model(self, path: str, what: str) -> nn.Module:
        """A frozen ``RewardModel`` from its checkpoint; its catalog must match the data's."""
        from recpost.methods.reward_model import load_reward_model  # the RM is itself a RecModule

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
    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's loss and any diagnostics to log under ``train/``. Subclasses define it."""
        raise RecpostError(f"{type(self).__name__} is a base class; use a method such as recpost.methods.SFT")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logs = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise RecpostError(f"training loss became {loss.item()} at step {self.global_step}; lower model.lr or check the rewards")
        batch_size = batch["input_items"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if logs:
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        if self.hparams.lr_schedule == "constant" and warmup == 0:
            return opt
        total = max(1, self.trainer.estimated_stepping_batches)

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

    def catalog_scorer(self, batch: dict[str, torch.Tensor]) -> ScoreColumns:
        """Encode each history once; returns ``columns -> [B, K]`` fp32 scores of those catalog columns
        (a slice, or item ids ``[K]``) for the next step, unmasked except padding (-inf)."""
        hidden = self.backbone.encode(batch["input_items"], batch.get("input_ratings"))[:, -1]  # [B, d]
        return lambda columns: self.backbone.score_columns(hidden, columns)

    def catalog_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 scores of every item for the next step after each history ``[B, n_items + 1]``;
        items of the history masked unless ``mask_history`` is off (padding always masked)."""
        scores = self.catalog_scorer(batch)(slice(None))  # [B, V + 1], fp32
        if self.hparams.mask_history:
            mask_items(scores, batch["history_items"])
        return scores

    def rank_catalog(self, batch: dict[str, torch.Tensor], k: int = TOP_K) -> CatalogRanking:
        """Top-``k`` items and the target's rank (if the batch has one) from ``score_chunk_size`` items at a
        time (the masking of ``catalog_scores``)."""
        return rank_in_chunks(
            self.catalog_scorer(batch), self.hparams.n_items + 1, self.hparams.score_chunk_size,
            target=batch.get("target_item"), history=batch["history_items"] if self.hparams.mask_history else None, k=k,
        )

    def extra_metric_names(self) -> tuple[str, ...]:
        """Names of the per-user values ``extra_metrics`` adds to the evaluation (averaged over users)."""
        return tuple(metric for name, metric in REWARD_MODEL_METRICS.items() if name in self._frozen)

    def extra_metrics(
        self, batch: dict[str, torch.Tensor], scores: torch.Tensor | CatalogRanking
    ) -> dict[str, torch.Tensor]:
        """Per-user values ``name -> [B]`` for ``scores [B, n_items + 1]`` (masked) or their ``CatalogRanking``:
        here the mean predicted rating of the top-10 under each reward model held (``rm_reward@10``,
        ``eval_rm_reward@10``), which scores only those 10 items."""
        out = {}
        held = [(name, metric) for name, metric in REWARD_MODEL_METRICS.items() if name in self._frozen]
        if held:
            ranking = scores if isinstance(scores, CatalogRanking) else CatalogRanking.from_scores(scores, k=RM_TOP_K)
            top = ranking.top_items[:, :RM_TOP_K]  # [B, 10]
            for name, metric in held:
                rewards = self._frozen[name].predict_rewards(batch["input_items"], batch["input_ratings"], top)  # [B, 10]
                out[metric] = rewards.float().mean(dim=-1)
        return out

    def _ground_truth_metrics(self, batch: dict[str, torch.Tensor], scores: torch.Tensor | None) -> dict[str, torch.Tensor]:
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

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: RankingMetrics) -> None:
        if self.hparams.score_chunk_size is None:
            scores = self.catalog_scores(batch)  # [B, V + 1]
            ranking = CatalogRanking.from_scores(scores, batch["target_item"])
        else:
            scores, ranking = None, self.rank_catalog(batch)  # never [B, V + 1] at once
        extra = self._ground_truth_metrics(batch, scores)
        extra.update(self.extra_metrics(batch, ranking))
        metrics.update(ranking, batch["target_item"], batch["target_rating"], batch["target_liked"], batch["user_index"], extra)

    def _log_metrics(self, metrics: RankingMetrics, prefix: str) -> dict[str, float]:
        values = metrics.compute()
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, sync_dist=False)
        return values

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics()
        self.val_metrics.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:
        self._reset_metrics()
        self.test_metrics.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")
        with self.test_metrics.sync_context():  # every rank's rows (compute() un-syncs after itself)
            rows = self.test_metrics.per_user()
        values = RankingMetrics.per_user_metrics(rows["rank"], self.test_metrics.ks)
        self.test_per_user = {"user_index": rows["user_index"], **values,
                              **{name: rows[name] for name in self.test_metrics.extra}}
        self.test_metrics.reset()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, k: int = 10) -> dict[str, torch.Tensor]:
        """Top-k unseen items for each user after their whole sequence."""
        if self.hparams.score_chunk_size is None:
            top = CatalogRanking.from_scores(self.catalog_scores(batch), k=k)
        else:
            top = self.rank_catalog(batch, k=k)
        return {"user_index": batch["user_index"], "items": top.top_items, "scores": top.top_scores}


class NextItemModule(RecModule):
    """Shared base of the methods trained by next-item cross-entropy (SFT, ExpSFT): full or sampled softmax.

    Args:
        softmax: ``full``: cross-entropy over the whole catalog (exact; logits ``[targets, n_items + 1]``
            per step). ``sampled``: over the target and ``num_negatives`` items shared by the batch, each
            logit corrected by ``- log q`` of its sampling probability (logQ), negatives equal to the
            target removed (cost ``[targets, num_negatives]``: flat in the catalog size). Training only:
            evaluation always ranks the whole catalog.
        num_negatives: negatives per batch for ``softmax: sampled`` (drawn with replacement); from
            ``n_items`` on, every item is a negative, which is the full softmax, computed exactly.
        negative_sampler: ``uniform`` over the catalog, or ``popularity``: proportional to each item's
            count in the training interactions (+1), i.e. harder negatives (the popular items a
            behaviour-cloning model over-ranks), with the same logQ correction.
        **kwargs: the shared settings of ``RecModule`` (backbone, lr, init_from, score_chunk_size, ...).
    """

    def __init__(
        self,
        *args,
        softmax: Literal["full", "sampled"] = "full",
        num_negatives: int = 1024,
        negative_sampler: Literal["uniform", "popularity"] = "uniform",
        **kwargs,
    ) -> None:
        if softmax not in ("full", "sampled"):
            raise RecpostError(f"model.softmax must be 'full' or 'sampled' (got {softmax!r})")
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise RecpostError(
                f"model.num_negatives must be an integer >= 1 (got {num_negatives!r}); e.g. 1024 negatives per batch"
            )
        if negative_sampler not in ("uniform", "popularity"):
            raise RecpostError(
                f"model.negative_sampler must be 'uniform' or 'popularity' (got {negative_sampler!r})"
            )
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("softmax", "num_negatives", "negative_sampler")
        # log q [n_items + 1] of the popularity sampler: from the training data at the start of fit
        # (or set_item_counts); not saved, so it always matches the data being trained on.
        self.register_buffer("negative_log_q", None, persistent=False)

    @property
    def sampled(self) -> bool:
        """Whether training uses the sampled softmax (``num_negatives >= n_items`` is the full softmax)."""
        return self.hparams.softmax == "sampled" and self.hparams.num_negatives < self.hparams.n_items

    def set_item_counts(self, counts: np.ndarray | torch.Tensor) -> None:
        """Training counts of each item ``[n_items + 1]`` for ``negative_sampler: popularity``."""
        counts = torch.as_tensor(counts)
        if counts.shape != (self.hparams.n_items + 1,):
            raise RecpostError(
                f"item counts have shape {tuple(counts.shape)}, expected ({self.hparams.n_items + 1},) (n_items + 1, "
                "index 0 = padding); use RecDataModule.train_item_counts() of the same data"
            )
        self.negative_log_q = popularity_log_q(counts).to(self.device)

    def on_fit_start(self) -> None:
        if self.sampled and self.hparams.negative_sampler == "popularity" and self.negative_log_q is None:
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "train_item_counts"):
                raise RecpostError(
                    "model.negative_sampler: popularity needs the training item counts: fit with a RecDataModule "
                    "(trainer.fit(model, datamodule=dm)) or call model.set_item_counts(dm.train_item_counts()) first"
                )
            self.set_item_counts(datamodule.train_item_counts())

    def next_item_cross_entropy(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-target next-item cross-entropy ``[N]`` (fp32, full or sampled softmax) and ``rewards [N]``
        at the N target positions of the batch (padding positions are skipped before the output layer)."""
        hidden = self.backbone.encode(batch["input_items"], batch.get("input_ratings"))  # [B, L, d]
        has_target = batch["target_items"] > 0  # [B, L]
        hidden, targets = hidden[has_target], batch["target_items"][has_target]  # [N, d], [N]
        rewards = batch["rewards"][has_target].float()
        if not self.sampled:
            logits = self.backbone.score(hidden)  # [N, V + 1], fp32
            return F.cross_entropy(logits.float(), targets, reduction="none"), rewards
        log_q = self._sampler_log_q()
        n_items = self.hparams.n_items
        negatives, log_q_negatives = sample_negatives(self.hparams.num_negatives, n_items, log_q, device=hidden.device)
        target_logits = self.backbone.score(hidden, targets[:, None]).squeeze(-1)  # [N], fp32
        negative_logits = self.backbone.score_columns(hidden, negatives)  # [N, K], fp32
        ce = sampled_softmax_cross_entropy(
            target_logits, negative_logits, targets, negatives, sampling_log_q(targets, n_items, log_q), log_q_negatives
        )
        return ce, rewards

    def _sampler_log_q(self) -> torch.Tensor | None:
        """``log q [n_items + 1]`` of the negative sampler; ``None`` for uniform."""
        if self.hparams.negative_sampler == "uniform":
            return None
        if self.negative_log_q is None:
            raise RecpostError(
                "model.negative_sampler: popularity has no item counts yet; train through trainer.fit with a "
                "RecDataModule, or call model.set_item_counts(dm.train_item_counts())"
            )
        return self.negative_log_q
