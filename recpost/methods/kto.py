"""KTO on logged feedback (Ethayarajh et al., 2024; TRL's ``KTOTrainer``, ``loss_type: kto``): no reward
model, no pairs. Each state with a logged next item is one example: **desirable** when its rating is at least
``data.liked_threshold`` (``next_liked``), **undesirable** when it is at most ``undesirable_max_rating``;
targets in between are left out. With ``rho = log pi(a|s) - log pi_ref(a|s)`` the log-ratio of the logged
item to the frozen starting policy,

- desirable: ``desirable_weight * (1 - sigmoid(beta * (rho - z0)))``;
- undesirable: ``undesirable_weight * (1 - sigmoid(beta * (z0 - rho)))``;

and the loss is their mean over the batch's examples. ``z0``, the reference point, is TRL's batch estimate of
the KL from mismatched pairs: the mean of ``log pi(a'|s) - log pi_ref(a'|s)`` with ``a'`` another user's logged
item (the one at the same position of the previous window in the batch, as TRL pairs each prompt with the
previous example's completion; pairs whose ``a'`` the state already had are skipped), without gradient, over
every DDP process, clamped at 0. A batch of one window has no mismatched pair (``z0 = 0``), as TRL warns.

Log-probabilities are over the catalog the user has not had (``mask_history``), ``score_chunk_size`` items at a
time, so no ``[states, items]`` tensor is built. Logged (TRL's names): ``kl`` (``z0``), ``rewards/chosen`` and
``rewards/rejected`` (``beta * rho`` of desirable / undesirable examples), ``rewards/margins``, ``logps/chosen``,
``logps/rejected``, and ``count/desirable``, ``count/undesirable`` (examples in the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recpost.core.batch import TrainBatch
from recpost.core.errors import RecpostError
from recpost.methods.catalog import catalog_logsumexp
from recpost.methods.checks import finite, positive
from recpost.methods.policy_base import PolicyModule


def kto_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor | float, beta: float,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses ``[P]`` and TRL's implicit rewards ``beta * rho`` ``[P]`` (no gradient), for the logged
    items' log-probabilities under the policy and the reference ``[P]``, ``desirable [P]`` bool and the reference
    point ``z0`` (a constant)."""
    rho = policy_logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - F.sigmoid(beta * (rho - z0))),
                         undesirable_weight * (1 - F.sigmoid(beta * (z0 - rho))))
    return losses, beta * rho.detach()


class KTO(PolicyModule):
    """KTO of the next-item policy on logged desirable and undesirable items, against the starting policy.

    Args:
        beta: the implicit reward's scale (TRL's default 0.1); > 0. Larger stays closer to the reference.
        desirable_weight: weight of the desirable examples' losses (TRL's default 1.0); > 0. The KTO paper
            advises ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` in [1, 4/3].
        undesirable_weight: weight of the undesirable examples' losses (TRL's default 1.0); > 0.
        undesirable_max_rating: targets rated at most this (stars, before ``data.reward_transform``) are
            undesirable; default 2, symmetric to the liked threshold 4 around 3 stars on 5-star data (3-star
            targets are neither). Must be below ``data.liked_threshold``.
        **kwargs: the shared settings of ``PolicyModule`` (``reward_model``: optional, only adds
            ``val/rm_reward@10``; state_positions, disable_dropout) and ``RecModule`` (lr, init_from, ...).
    """

    divergence_hint = "lower model.lr"

    @classmethod
    def needs_reward_model(cls, init_args) -> bool:
        return False

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        positive("beta", s["beta"], "TRL's default is 0.1; larger stays closer to the starting policy")
        positive("desirable_weight", s["desirable_weight"], "TRL's default is 1.0")
        positive("undesirable_weight", s["undesirable_weight"], "TRL's default is 1.0")
        finite("undesirable_max_rating", s["undesirable_max_rating"], "e.g. 2 on 5-star data")
        super().check_settings(**settings)

    def __init__(self, *args, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 undesirable_max_rating: float = 2.0, **kwargs) -> None:
        self.check_settings_once(dict(beta=beta, desirable_weight=desirable_weight,
                                      undesirable_weight=undesirable_weight,
                                      undesirable_max_rating=undesirable_max_rating, **kwargs))
        super().__init__(*args, **kwargs)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "rating_range"):
            self.check_thresholds(datamodule)

    def check_thresholds(self, datamodule) -> None:
        """Refuse an undesirable threshold that overlaps the liked one, or that no rating of ``datamodule`` reaches."""
        low, liked = datamodule.rating_range[0], datamodule.liked_threshold
        worst = self.hparams.undesirable_max_rating
        if worst >= liked:
            raise RecpostError(f"model.undesirable_max_rating {worst:g} must be below data.liked_threshold {liked:g}: "
                               "a target cannot be desirable and undesirable; e.g. 2 with liked_threshold 4")
        if worst < low:
            raise RecpostError(f"model.undesirable_max_rating {worst:g} is below the data's lowest rating {low:g}: no "
                               f"target would be undesirable; use a value in [{low:g}, {liked:g})")

    def _examples(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [B, L] bool, desirable [B, L] bool)``: the states whose logged item is desirable or undesirable."""
        liked = batch["next_liked"]
        low = batch["next_ratings"] <= self.hparams.undesirable_max_rating
        undesirable = (batch["next_items"] > 0) & ~liked & low
        return self.states(batch) & (liked | undesirable), liked

    def _log_probs(self, batch: TrainBatch, states: torch.Tensor, items: torch.Tensor, reference: bool):
        """``log pi(items | state)`` ``[P, 2]`` over the catalog the user has not had (with gradient for the policy)
        and what each state had ``[P, H + L]`` (``None`` without ``mask_history``)."""
        hidden, history = self.state_hidden(batch, states, reference=reference)  # [P, d]
        lse = catalog_logsumexp(self.scorer(reference), hidden, history, self.n_columns, self.chunk_size)  # [P]
        backbone = self.reference if reference else self.backbone
        return backbone.score(hidden, items) - lse[:, None], history

    def _reference_point(self, policy: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``z0``: the mean log-ratio of the mismatched pairs over every process (no gradient), clamped at 0."""
        with torch.no_grad():
            stats = torch.stack([(policy - reference)[valid].sum(), valid.sum().to(policy.dtype)])
            if self._trainer is not None and self.trainer.world_size > 1:
                stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
            return (stats[0] / stats[1].clamp_min(1.0)).clamp_min(0.0)

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        states, liked = self._examples(batch)  # [B, L]
        # a' of state (b, t): the item logged at position t of the previous window (0: none, or a batch of one window)
        other = batch["next_items"].roll(1, dims=0) if len(states) > 1 else torch.zeros_like(batch["next_items"])
        items = torch.stack([batch["next_items"][states], other[states]], dim=1)  # [P, 2]: logged, mismatched
        policy, history = self._log_probs(batch, states, items, reference=False)
        with torch.no_grad():
            reference, _ = self._log_probs(batch, states, items, reference=True)
        had = (torch.zeros_like(items, dtype=torch.bool) if history is None
               else (history[:, :, None] == items[:, None, :]).any(1))  # [P, 2]: the state already had the item
        keep, valid = ~had[:, 0], (items[:, 1] > 0) & ~had[:, 1]  # a repeated logged item has probability 0: no example
        z0 = self._reference_point(policy[:, 1].detach(), reference[:, 1], valid)
        desirable = liked[states][keep]
        losses, rewards = kto_loss(policy[keep, 0], reference[keep, 0], desirable, z0, hp.beta, hp.desirable_weight,
                                   hp.undesirable_weight)
        # No example in this batch (tiny data): a zero loss that still reaches every parameter (DDP needs it).
        loss = losses.mean() if len(losses) else sum(p.sum() for p in self.backbone.parameters()) * 0.0
        logs = {"kl": z0, "count/desirable": desirable.sum().float(), "count/undesirable": (~desirable).sum().float()}
        logps = policy[keep, 0].detach()
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            if rows.any():
                logs[f"rewards/{name}"], logs[f"logps/{name}"] = rewards[rows].mean(), logps[rows].mean()
        if desirable.any() and (~desirable).any():
            logs["rewards/margins"] = logs["rewards/chosen"] - logs["rewards/rejected"]
        return loss, logs
