"""``PolicyModule``: what the policy-optimisation methods (PPO, DPO, and variants such as online DPO or
GRPO) share, so that a new one is a short file with its loss.

The contextual-bandit view: a state is a position of a training window (the history up to it), an
action is one item. The base holds

- the **frozen reference** policy: a copy of the initial policy (``init_from``), never trained;
- the optional frozen **reward model** (``reward_model``: a RewardModel checkpoint), which also adds
  ``rm_reward@10`` to the evaluation;
- **state selection** (``state_positions``: ``all`` positions with a logged next item, or the ``last``);
- the **dropout policy** (``disable_dropout``: off, as TRL does for RL, so log-probabilities of a state
  agree between sampling and update, and policy and reference differ only by training);
- **masked log-probabilities** over the catalog: everything the user had by the state (the window's
  items up to it *and* the user's earlier items, ``earlier_items``) has probability 0, as in evaluation;
- TRL's metric names in the logs (no ``train/`` prefix on the diagnostics).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch

from recpost.core.batch import TrainBatch
from recpost.methods.base import RecModule
from recpost.methods.checks import one_of
from recpost.methods.policy import state_history, state_log_probs, state_positions
from recpost.models import Backbone, RatingModel, frozen_copy
from recpost.models import disable_dropout as turn_off_dropout  # the argument of the same name is a flag

StatePositions = Literal["all", "last"]
STATE_POSITIONS = get_args(StatePositions)


class FrozenReferenceAndRewardModel:
    """Accessors of the frozen initial policy (``reference``) and reward model (``reward_model``) a method
    holds with ``RecModule.hold_frozen`` under those names (PPO, DPO, A-SFT)."""

    @property
    def reference(self) -> Backbone:
        """The frozen initial policy."""
        return self._frozen["reference"]

    @property
    def reward_model(self) -> RatingModel:
        """The frozen reward model (where the method was given one)."""
        return self._frozen["reward_model"]


class PolicyModule(FrozenReferenceAndRewardModel, RecModule):
    """Shared base of the methods that optimise the next-item policy against a reward or preferences.

    Args:
        reward_model: a RewardModel checkpoint (``best.ckpt`` of ``configs/method/reward_model.yaml``),
            held frozen; whether a method needs one is its ``needs_reward_model``.
        state_positions: ``all`` positions with a logged next item (the states SFT trains on), or the
            ``last`` one per window.
        disable_dropout: no dropout in the policy (TRL's default for RL).
        **kwargs: the shared settings of ``RecModule`` (backbone, lr, init_from, ...).
    """

    takes_reward_model = True
    log_prefix = ""  # TRL's names: objective/..., policy/..., rewards/...

    @classmethod
    def needs_reward_model(cls, init_args) -> bool:
        return True

    @classmethod
    def check_settings(cls, **settings) -> None:
        one_of("state_positions", {**cls.setting_defaults(), **settings}["state_positions"], STATE_POSITIONS)
        super().check_settings(**settings)

    def __init__(
        self,
        *args,
        reward_model: str | None = None,
        state_positions: StatePositions = "all",
        disable_dropout: bool = True,
        **kwargs,
    ) -> None:
        self.check_settings_once(dict(reward_model=reward_model, state_positions=state_positions,
                                      disable_dropout=disable_dropout, **kwargs))
        super().__init__(*args, **kwargs)
        if disable_dropout:
            turn_off_dropout(self.backbone)
        self.hold_frozen("reference", frozen_copy(self.backbone))
        if reward_model:
            self.hold_frozen("reward_model", self.load_reward_model(reward_model, "model.reward_model"))

    def states(self, batch: TrainBatch) -> torch.Tensor:
        """The bandit states of the batch ``[B, L]`` bool (``state_positions``)."""
        return state_positions(batch, self.hparams.state_positions)

    def log_probs(
        self, batch: TrainBatch, states: torch.Tensor, rows: torch.Tensor | None = None, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log pi(. | state)`` over the catalog ``[N, V + 1]`` and the states' hidden vectors ``[N, d]``,
        at ``states [B, L]`` of the windows ``rows`` (all by default), under the policy or the
        ``reference``; what the user had by each state has probability 0 (unless ``mask_history`` is off)."""
        select = slice(None) if rows is None else rows
        timestamps = batch.get("input_timestamps")
        return state_log_probs(
            self.reference if reference else self.backbone, batch["input_items"][select],
            batch["input_ratings"][select], states[select], self.hparams.mask_history, batch["earlier_items"][select],
            timestamps[select] if timestamps is not None else None,
        )

    # ----------------------------------------------------------------------------------- large catalogs
    @property
    def n_columns(self) -> int:
        return self.hparams.n_items + 1

    @property
    def chunk_size(self) -> int:
        """Catalog items scored at a time in training (``score_chunk_size``; the whole catalog when null)."""
        return self.hparams.score_chunk_size or self.n_columns

    def state_hidden(
        self, batch: TrainBatch, states: torch.Tensor, rows: torch.Tensor | None = None, reference: bool = False,
        with_history: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The states' hidden vectors ``[N, d]`` under the policy or the ``reference``, and what the user had by
        each state ``[N, H + L]`` (item ids, 0 = none; ``None`` when ``mask_history`` is off or not
        ``with_history``: a caller that has it already): what the catalog functions of
        ``recpost.methods.catalog`` take, without any ``[N, n_items]`` tensor."""
        select = slice(None) if rows is None else rows
        items, timestamps = batch["input_items"][select], batch.get("input_timestamps")
        backbone = self.reference if reference else self.backbone
        hidden = backbone.encode(items, batch["input_ratings"][select],
                                 timestamps[select] if timestamps is not None else None)[states[select]]  # [N, d]
        history = (state_history(items, states[select], batch["earlier_items"][select])
                   if self.hparams.mask_history and with_history else None)
        return hidden, history

    @contextmanager
    def dropout_off(self) -> Iterator[None]:
        """The policy in eval mode inside the block (as the reference always is), its mode restored after:
        what a method samples from the policy is then the policy's own distribution, even with
        ``disable_dropout: false`` (which keeps dropout for the updates)."""
        training = self.backbone.training
        self.backbone.eval()
        try:
            yield
        finally:
            self.backbone.train(training)

    def scorer(self, reference: bool = False):
        """``(hidden [N, d], columns) -> logits [N, C]`` of the policy or the reference."""
        return (self.reference if reference else self.backbone).score_columns

    def rewards(self, batch: TrainBatch, states: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The reward model's predicted rating of ``items [N, K]`` at the ``states [B, L]`` -> ``[N, K]``
        (only those items are scored)."""
        return self.reward_model.rewards_at(batch["input_items"], batch["input_ratings"], states, items,
                                            batch.get("input_timestamps"))
