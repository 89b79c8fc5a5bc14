"""``RewardWeightedModule``: what the reward-weighted SFT methods (ExpSFT, LinearSFT, A-SFT) share on top
of ``NextItemModule``: a non-negative weight per logged target times its cross-entropy, and

- the weights' **normalisation** (``weight_norm``): ``none``, the raw weights (the paper's Algorithm 1);
  ``batch_mean``, divided by their mean over the *global* batch (every DDP process's targets, so 2
  processes train exactly as 1 on the union batch); ``fixed``, divided by the weight of the largest
  possible signal: a constant, so unlike ``batch_mean`` it cannot bias the optimum;
- where that largest signal comes from: the method's own setting (``reward_max``, ``advantage_max``) or,
  when it is null, the training data's rating scale, read at the start of fit;
- the loss as the mean over the global batch (``losses.weighted_mean_coefficients``) and the diagnostics every
  weighted method logs: ``weight_min``, ``weight_mean``, ``weight_max``, ``ess`` (Kish effective
  sample size as a share of the batch), ``ce``, ``liked_loss_share``.

A method on it computes its weights (``losses.exp_reward_weights`` or ``linear_reward_weights``) and calls
``weighted_loss``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist

from recpost.core.batch import TrainBatch
from recpost.core.errors import RecpostError
from recpost.methods.checks import one_of, optional, positive
from recpost.methods.losses import WEIGHT_NORMS, Gather, WeightNorm, effective_sample_size, weighted_mean_coefficients
from recpost.methods.next_item import NextItemModule, Targets


def gather_across_processes(stats: torch.Tensor) -> torch.Tensor:
    """``stats [k]`` of every process -> ``[P, k]`` (rank order), through ``torch.distributed``; every
    process must call it at the same step, as training steps under DDP do."""
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, stats.contiguous())
    return torch.stack(parts)


class RewardWeightedModule(NextItemModule):
    """Shared base of the reward-weighted SFT methods (see the module docstring).

    Args:
        weight_norm: ``batch_mean`` (default: weights over their global batch mean), ``none`` (raw weights)
            or ``fixed`` (weights over the weight of the largest possible signal, the method's
            ``bound_setting``).
        max_weight: clip the weights (after normalising) at this value; ``null`` = no clip.
        **kwargs: the shared settings of ``NextItemModule`` (softmax: full | sampled, ...) and ``RecModule``
            (backbone, lr, init_from, ...).
    """

    #: The method's setting that holds the largest possible signal for ``weight_norm: fixed``; ``None``: the
    #: method's weights are already at most 1 (filtered BC's 0/1), nothing to read.
    bound_setting: ClassVar[str | None] = "reward_max"

    @classmethod
    def check_settings(cls, **settings: Any) -> None:
        s = {**cls.setting_defaults(), **settings}
        one_of("weight_norm", s["weight_norm"], WEIGHT_NORMS)
        optional(positive, "max_weight", s["max_weight"])
        super().check_settings(**settings)

    def __init__(self, *args, weight_norm: WeightNorm = "batch_mean", max_weight: float | None = None, **kwargs) -> None:
        self.check_settings_once(dict(weight_norm=weight_norm, max_weight=max_weight, **kwargs))
        super().__init__(*args, **kwargs)
        self._bound_from_data: float | None = None

    # ----------------------------------------------------------------------------------- fixed normaliser
    def bound_from_data(self, datamodule) -> float:
        """The largest possible signal by the training data (``RecDataModule``): here the top of its rating
        scale on the reward scale (``data.reward_transform``)."""
        return datamodule.reward_range[1]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.weight_norm == "fixed" and self.bound_setting and self.hparams[self.bound_setting] is None:
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "reward_range"):
                raise RecpostError(
                    f"model.weight_norm: fixed needs model.{self.bound_setting} or a RecDataModule to read the rating "
                    f"scale from; set model.{self.bound_setting} or fit with trainer.fit(model, datamodule=dm)"
                )
            self._bound_from_data = float(self.bound_from_data(datamodule))

    def set_weight_bound_from(self, datamodule) -> None:
        """Read the ``fixed`` normaliser's bound from ``datamodule`` now (what the start of fit does)."""
        self._bound_from_data = float(self.bound_from_data(datamodule))

    @property
    def weight_bound(self) -> float | None:
        """The largest possible signal for ``weight_norm: fixed`` (the setting, else the data's); ``None``
        for the other normalisations."""
        if self.hparams.weight_norm != "fixed":
            return None
        if self.bound_setting is None:
            return 1.0
        bound = self.hparams[self.bound_setting]
        bound = self._bound_from_data if bound is None else bound
        if bound is None:
            raise RecpostError(
                f"model.weight_norm: fixed has no bound yet: set model.{self.bound_setting}, train through trainer.fit "
                "with a RecDataModule, or call model.set_weight_bound_from(dm)"
            )
        return bound

    # ----------------------------------------------------------------------------------- the loss
    @property
    def gather(self) -> Gather | None:
        """How batch statistics reach every process under DDP (``None`` in one process)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return gather_across_processes
        return None

    def weighted_loss(
        self, targets: Targets, weights: torch.Tensor, batch: TrainBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``mean(w * ce)`` over the global batch for the batch's ``targets`` and their ``weights [N]`` (in
        ``next_items > 0`` order), and the shared diagnostics."""
        if self.hparams.target_norm == "dataset":
            # every target the same weight in every batch (NextItemModule.target_norm); under DDP each
            # process's sum over the same divisor, averaged by DDP: the global sum over the global divisor
            coefficients = weights.detach().float() * self.target_norm_coefficients(targets.rewards)
        else:
            coefficients = weighted_mean_coefficients(weights, self.gather)
        loss, ce = self.target_loss(targets, coefficients)
        with torch.no_grad():
            weighted = weights * ce
            liked = batch["next_liked"][batch["next_items"] > 0]  # [N]
            logs = {
                "weight_min": weights.min(), "weight_mean": weights.mean(), "weight_max": weights.max(),
                "ess": effective_sample_size(weights), "ce": ce.mean(),
                "liked_loss_share": weighted[liked].sum() / weighted.sum().clamp_min(1e-12),
            }
        return loss, logs
