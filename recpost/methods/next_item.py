"""``NextItemModule``: what the next-item cross-entropy methods (SFT, ExpSFT, and the other weighted
SFT variants) share: the per-target cross-entropy of the logged next item, over the full catalog or
a sampled softmax for large catalogs. A method on it only decides how to weigh the targets.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import numpy as np
import torch

from recpost.core.batch import TrainBatch
from recpost.core.errors import RecpostError
from recpost.methods.base import RecModule
from recpost.methods.checks import at_least, one_of
from recpost.methods.losses import popularity_log_q, sample_negatives, sampled_softmax_cross_entropy, sampling_log_q

Softmax = Literal["full", "sampled"]
NegativeSampler = Literal["uniform", "popularity"]
TargetNorm = Literal["batch", "dataset"]
SOFTMAXES, NEGATIVE_SAMPLERS, TARGET_NORMS = get_args(Softmax), get_args(NegativeSampler), get_args(TargetNorm)


class Targets(NamedTuple):
    """A training batch's N next-item targets, in ``next_items > 0`` order (padding positions skipped)."""

    hidden: torch.Tensor  # [N, d]: the states that predict them
    items: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N], fp32


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
        target_norm: how a batch's per-target losses become its loss. ``batch``: their mean, so every
            batch weighs the same however many targets it has. ``dataset``: their sum over the mean
            number of targets per training batch of the data (read at the start of fit): every target
            weighs the same in every batch, so the way windows are grouped into batches cannot reweigh
            them. With ``data.length_grouping`` a batch of short windows has few targets, and ``batch``
            would give each of them several times the weight of a target in a batch of long windows;
            ``dataset`` makes a grouped epoch's summed loss and gradient equal to an ungrouped one's.
        **kwargs: the shared settings of ``RecModule`` (backbone, lr, init_from, score_chunk_size, ...).
    """

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        one_of("softmax", s["softmax"], SOFTMAXES)
        at_least("num_negatives", s["num_negatives"], 1, "e.g. 1024 negatives per batch")
        one_of("negative_sampler", s["negative_sampler"], NEGATIVE_SAMPLERS)
        one_of("target_norm", s["target_norm"], TARGET_NORMS)
        super().check_settings(**settings)

    def __init__(
        self,
        *args,
        softmax: Softmax = "full",
        num_negatives: int = 1024,
        negative_sampler: NegativeSampler = "uniform",
        target_norm: TargetNorm = "batch",
        **kwargs,
    ) -> None:
        self.check_settings_once(dict(softmax=softmax, num_negatives=num_negatives, negative_sampler=negative_sampler,
                                      target_norm=target_norm, **kwargs))
        super().__init__(*args, **kwargs)
        # log q [n_items + 1] of the popularity sampler: from the training data at the start of fit
        # (or set_item_counts); not saved, so it always matches the data being trained on.
        self.register_buffer("negative_log_q", None, persistent=False)
        self.targets_per_batch: float | None = None  # target_norm: dataset; from the data at the start of fit

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

    def set_targets_per_batch(self, datamodule) -> None:
        """``target_norm: dataset``'s divisor from ``datamodule`` (a ``RecDataModule``): the mean number of
        next-item targets of a training window times the batch size (what the start of fit does)."""
        self.targets_per_batch = float(np.mean(datamodule.train_window_targets())) * datamodule.batch_size

    def target_norm_coefficients(self, like: torch.Tensor) -> torch.Tensor:
        """How a batch's per-target losses ``[N]`` become its loss, ``sum(c * losses)``, by ``target_norm``:
        ``c = 1 / N`` (their mean) or one over the data's mean targets per batch. ``like [N]`` (e.g. the
        targets' rewards) gives N, dtype and device."""
        if self.hparams.target_norm == "batch":
            return like.new_full(like.shape, 1.0 / max(like.numel(), 1)).detach()
        if self.targets_per_batch is None:
            raise RecpostError(
                "model.target_norm: dataset needs the training data's targets per batch: fit with a RecDataModule "
                "(trainer.fit(model, datamodule=dm)) or call model.set_targets_per_batch(dm) first"
            )
        return like.new_full(like.shape, 1.0 / self.targets_per_batch).detach()

    def on_fit_start(self) -> None:
        if self.hparams.target_norm == "dataset" and self.targets_per_batch is None:
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "train_windows"):
                raise RecpostError(
                    "model.target_norm: dataset needs the training data's targets per batch: fit with a RecDataModule "
                    "(trainer.fit(model, datamodule=dm)) or call model.set_targets_per_batch(dm) first"
                )
            self.set_targets_per_batch(datamodule)
        if self.sampled and self.hparams.negative_sampler == "popularity" and self.negative_log_q is None:
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "train_item_counts"):
                raise RecpostError(
                    "model.negative_sampler: popularity needs the training item counts: fit with a RecDataModule "
                    "(trainer.fit(model, datamodule=dm)) or call model.set_item_counts(dm.train_item_counts()) first"
                )
            self.set_item_counts(datamodule.train_item_counts())

    def next_item_targets(self, batch: TrainBatch) -> Targets:
        """The batch's next-item targets with the hidden states that predict them (padding positions are
        skipped before the output layer)."""
        hidden = self.backbone.encode(batch["input_items"], batch.get("input_ratings"),
                                      batch.get("input_timestamps"))  # [B, L, d]
        has_target = batch["next_items"] > 0  # [B, L]
        return Targets(hidden[has_target], batch["next_items"][has_target], batch["next_rewards"][has_target].float())

    def next_item_cross_entropy(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-target next-item cross-entropy ``[N]`` (fp32, full or sampled softmax, with its gradient) and
        ``rewards [N]`` at the N target positions of the batch."""
        targets = self.next_item_targets(batch)
        return self.target_cross_entropy(targets), targets.rewards

    def target_cross_entropy(self, targets: Targets) -> torch.Tensor:
        """``ce [N]`` (fp32, with its gradient) of the targets, over the full catalog or a sampled softmax."""
        hidden, items = targets.hidden, targets.items
        if not self.sampled:
            return self.backbone.cross_entropy(hidden, items)  # [N], fp32
        log_q = self._sampler_log_q()
        n_items = self.hparams.n_items
        negatives, log_q_negatives = sample_negatives(self.hparams.num_negatives, n_items, log_q, device=hidden.device)
        target_logits = self.backbone.score(hidden, items[:, None]).squeeze(-1)  # [N], fp32
        negative_logits = self.backbone.score_columns(hidden, negatives)  # [N, K], fp32
        return sampled_softmax_cross_entropy(
            target_logits, negative_logits, items, negatives, sampling_log_q(items, n_items, log_q), log_q_negatives
        )

    def target_loss(self, targets: Targets, coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum(coefficients * ce), ce [N] without gradient)`` for constant ``coefficients [N]`` (the batch's
        reduction, times the method's weights). Full softmax: the fused cross-entropy, whose forward computes
        the gradients from one softmax pass (:meth:`Backbone.weighted_cross_entropy`); sampled: through autograd."""
        if not self.sampled:
            return self.backbone.weighted_cross_entropy(targets.hidden, targets.items, coefficients)
        ce = self.target_cross_entropy(targets)
        return (coefficients.detach() * ce).sum(), ce.detach()

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
