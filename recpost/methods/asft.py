"""Advantage-weighted SFT (A-SFT): next-item cross-entropy weighted by ``exp(A / lam)``, with the advantage
``A = r - b(s)`` of the logged target over a reward model's expected reward at its state.

``b(s) = sum_a pi_ref(a|s) rhat(s, a)`` over the catalog: the frozen reward model's predicted rating of
every item the user has not had (history masked as the policy masks it), averaged under the frozen
reference policy, the initial (pretrained) one. A per-state constant cancels in the softmax, so
A-SFT and ExpSFT have the same per-state optimum ``pi_beta * exp(r / lam)``; what the baseline changes is
how much each *state* counts in the gradient of the shared parameters: ExpSFT's weights favour states
where everything is rated well (generous users, easy histories), A-SFT's weigh each target by how much
better it was than what the reference would have got at its state.

This is the advantage-weighted regression form (AWR, Peng et al., 2019; Nair et al.'s AWAC). The
predecessor paper's exact A-SFT formula is not known to us: this is our reading of "advantage-weighted
SFT", not a reproduction of its equation.

Scale: the reward model predicts ratings on the source's scale (stars) whatever
``data.reward_transform``, so ``r`` is the logged rating (``next_ratings``) and ``A`` and ``lam`` are in
stars (as PPO's rewards and ``kl_coef``); on identity or centered rewards that is the reward scale
too (a shift cancels in ``A``). With a constant ``b`` A-SFT is ExpSFT up to a constant factor (equal
under ``batch_mean``); with ``lam -> inf`` it is SFT. ``weight_norm: fixed`` divides by the weight of
the largest possible advantage, ``advantage_max`` (null: the width of the rating scale, 4 on 1..5 stars).

Cost per step: the reference and the reward model encode the batch, and both score the catalog at
every target's state, a block of states and ``score_chunk_size`` items (default: all) at a time
(``[rows, chunk]`` memory, a few MB), without gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from recpost.core.batch import TrainBatch
from recpost.methods.catalog import chunks, masked_chunk
from recpost.methods.checks import finite_positive, optional, require
from recpost.methods.losses import check_finite_rewards, exp_reward_weights
from recpost.methods.policy import state_history
from recpost.methods.policy_base import FrozenReferenceAndRewardModel
from recpost.methods.weighted import RewardWeightedModule
from recpost.models import frozen_copy
from recpost.models.fused_ce import row_blocks


def expected_under_policy(
    logits: Callable[[slice], torch.Tensor],
    values: Callable[[slice], torch.Tensor],
    history: torch.Tensor | None,
    n_columns: int,
    chunk_size: int,
) -> torch.Tensor:
    """``sum_a pi(a|s) v(s, a)`` per state ``[N]``, ``pi`` the softmax of ``logits`` over the catalog with the
    ``history [N, K]`` items (0 = none) and padding excluded.

    ``logits(columns)`` and ``values(columns)`` give ``[N, C]`` for a slice of the ``n_columns`` catalog
    columns. One pass, ``chunk_size`` columns at a time (an online softmax: running max, normaliser and
    weighted sum, rescaled when the max grows), so memory is ``[N, chunk_size]``.
    """
    top = normaliser = total = None
    for columns in chunks(n_columns, chunk_size):
        z = masked_chunk(logits(columns).float(), columns, history)  # [N, C]; excluded items at MASKED
        v = values(columns).float()  # [N, C]
        new_top = z.max(dim=1).values if top is None else torch.maximum(top, z.max(dim=1).values)  # [N]
        p = torch.exp(z - new_top[:, None])  # [N, C]; excluded items: exactly 0 once any item is allowed
        chunk_norm, chunk_total = p.sum(dim=1), (p * v).sum(dim=1)
        if top is None:
            normaliser, total = chunk_norm, chunk_total
        else:
            rescale = torch.exp(top - new_top)  # [N]
            normaliser, total = normaliser * rescale + chunk_norm, total * rescale + chunk_total
        top = new_top
    return total / normaliser


class ASFT(FrozenReferenceAndRewardModel, RewardWeightedModule):
    """Cross-entropy of the logged next item weighted by ``exp((r - b(s)) / lam)`` (see the module docstring).

    Args:
        lam: temperature lambda > 0, in stars (the reward model's scale).
        reward_model: a RewardModel checkpoint (``best.ckpt`` of ``configs/method/reward_model.yaml``), held
            frozen; required. Also adds ``rm_reward@10`` to the evaluation.
        advantage_max: the largest possible advantage, for ``weight_norm: fixed`` (weights
            ``exp((A - advantage_max) / lam)``); ``null``: the width of the data's rating scale (4 on 1..5
            stars), read at the start of fit.
        **kwargs: ``weight_norm``, ``max_weight`` (``RewardWeightedModule``), the shared settings of
            ``NextItemModule`` and ``RecModule`` (``score_chunk_size`` also chunks the baseline's catalog sum).
    """

    takes_reward_model = True
    bound_setting = "advantage_max"

    @classmethod
    def needs_reward_model(cls, init_args) -> bool:
        return True

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        finite_positive("lam", s["lam"], "try 0.25-2 (stars)")
        require(bool(s["reward_model"]), "ASFT needs model.reward_model: the best.ckpt of `recpost fit --config "
                "<pretrain.yaml> --config configs/method/reward_model.yaml`")
        optional(finite_positive, "advantage_max", s["advantage_max"], hint="null reads it from the data's rating scale")
        super().check_settings(**settings)

    def __init__(self, *args, lam: float = 1.0, reward_model: str | None = None, advantage_max: float | None = None,
                 **kwargs) -> None:
        self.check_settings_once(dict(lam=lam, reward_model=reward_model, advantage_max=advantage_max, **kwargs))
        super().__init__(*args, **kwargs)
        self.hold_frozen("reference", frozen_copy(self.backbone))  # the initial policy (after init_from)
        self.hold_frozen("reward_model", self.load_reward_model(reward_model, "model.reward_model"))

    def bound_from_data(self, datamodule) -> float:
        low, high = datamodule.rating_range
        return high - low

    @torch.no_grad()
    def baseline(self, batch: TrainBatch, states: torch.Tensor) -> torch.Tensor:
        """``b(s)``: the reward model's expected rating under the reference at the ``states [B, L]`` -> ``[N]``."""
        items, ratings, timestamps = batch["input_items"], batch["input_ratings"], batch.get("input_timestamps")
        hidden = self.reference.encode(items, ratings, timestamps)[states]  # [N, d]
        offset, query, item_emb = self.reward_model.states(items, ratings, timestamps)  # [B, L], [B, L, d], [V + 1, d]
        offset, query = offset[states], query[states]  # [N], [N, d]
        history = state_history(items, states, batch["earlier_items"]) if self.hparams.mask_history else None
        n_columns = self.hparams.n_items + 1
        chunk = self.hparams.score_chunk_size or n_columns
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        # A block of states at a time (as the fused losses): [rows, chunk] tensors of a few MB, never [N, n_items]
        # (ML-20M's shape without score_chunk_size: 14k states x 26.7k items held the step at 8.3 GB).
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for rows in row_blocks(hidden.shape[0], chunk):
                out[rows] = expected_under_policy(
                    lambda columns: self.reference.score_columns(hidden[rows], columns),
                    lambda columns: self.reward_model.head.score_columns(offset[rows], query[rows], item_emb, columns),
                    history[rows] if history is not None else None, n_columns, chunk,
                )
        return out

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = self.next_item_targets(batch)
        states = batch["next_items"] > 0  # [B, L]: the targets' positions, in the order of ce
        ratings = batch["next_ratings"][states].float()  # [N], stars
        check_finite_rewards(ratings)
        baseline = self.baseline(batch, states)  # [N]
        advantages = ratings - baseline  # [N]
        weights = exp_reward_weights(advantages, self.hparams.lam, self.hparams.weight_norm, self.hparams.max_weight,
                                     self.weight_bound, self.gather)  # [N]
        loss, logs = self.weighted_loss(targets, weights, batch)
        logs.update(baseline=baseline.mean(), advantage=advantages.mean(), advantage_std=advantages.std(correction=0))
        return loss, logs
