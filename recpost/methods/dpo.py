"""DPO (and IPO) on item pairs per state, against a frozen reference (the initial policy).

A pair at a state (a position of a training window, its history masked) is a chosen and a rejected
item; the loss pushes the policy's log-ratio to the reference up for the chosen one (TRL's DPOTrainer):

- ``loss_type: sigmoid``: ``-log sigmoid(beta * margin)`` (with ``label_smoothing`` eps:
  ``-(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)``, cDPO);
- ``loss_type: ipo``: ``(margin - 1 / (2 beta))^2``;

where ``margin = (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))``.

Pairs (``pair_source``):

- ``reward_model``: two distinct items sampled from the reference policy at the state, ranked by the
  frozen reward model (exact ties skipped): the offline RLHF recipe, where the RM can be hacked;
- ``logged``: the logged next item and another item the same user rated later in the same window
  (chosen uniformly among those with a different rating and not in the state's history); the
  higher-rated one is chosen. No reward model; needs ``state_positions: all``.

Logged per batch (TRL's names and definitions): ``rewards/chosen`` and ``rewards/rejected``
(``beta * (log pi - log pi_ref)``), ``rewards/margins`` (their difference), ``rewards/accuracies``
(share of pairs with chosen > rejected), ``logps/chosen``, ``logps/rejected``, and ``pairs/kept``
(share of states that gave a pair).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from recpost.errors import RecpostError
from recpost.methods.base import RecModule
from recpost.methods.policy import disable_dropout as turn_off_dropout
from recpost.methods.policy import frozen_copy, prefix_history_mask, sample_items, state_log_probs, state_positions


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and TRL's implicit rewards ``beta * (log pi - log pi_ref)`` of chosen and rejected.

    All inputs are log-probabilities ``[P]``; returns ``(losses [P], chosen_rewards [P], rejected_rewards [P])``.
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise RecpostError(f"loss_type must be 'sigmoid' or 'ipo' (got {loss_type!r})")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def logged_pairs(
    target_items: torch.Tensor,
    target_ratings: torch.Tensor,
    states: torch.Tensor,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs from logged ratings: at each state ``(b, t)``, the logged next item ``target_items[b, t]``
    against a later target ``target_items[b, s]`` (``s > t``) of another rating, not in ``seen[b, t]``
    (``[B, L, V + 1]`` bool, the state's history), drawn uniformly; the higher rating is chosen.

    Inputs ``[B, L]``; returns ``(chosen [B, L], rejected [B, L], valid [B, L] bool)``.
    """
    B, L = target_items.shape
    later = torch.ones(L, L, dtype=torch.bool, device=target_items.device).triu(diagonal=1)  # [t, s]: s > t
    other_ratings = target_ratings[:, None, :].expand(B, L, L)
    candidates = later & (target_items[:, None, :] > 0) & (other_ratings != target_ratings[:, :, None])
    candidates &= states[:, :, None]
    if seen is not None:
        candidates &= ~seen.gather(2, target_items[:, None, :].expand(B, L, L))
        candidates &= ~seen.gather(2, target_items[:, :, None])  # a repeated logged item (keep_repeats) is no pair
    noise = torch.rand(B, L, L, generator=generator, device=target_items.device)
    pick = noise.masked_fill(~candidates, -1.0).argmax(dim=-1)  # [B, L]
    other_item, other_rating = target_items.gather(1, pick), target_ratings.gather(1, pick)
    logged_better = target_ratings > other_rating
    chosen = torch.where(logged_better, target_items, other_item)
    rejected = torch.where(logged_better, other_item, target_items)
    return chosen, rejected, candidates.any(dim=-1)


class DPO(RecModule):
    """Direct preference optimisation of the next-item policy on item pairs.

    Args:
        beta: inverse temperature of the implicit reward (TRL's default 0.1); > 0.
        loss_type: ``sigmoid`` (DPO) or ``ipo``.
        label_smoothing: cDPO's assumed share of flipped labels, in [0, 0.5) (sigmoid only).
        pair_source: ``reward_model`` (two reference samples ranked by the RM) or ``logged`` ratings.
        reward_model: the RewardModel checkpoint; required for ``pair_source: reward_model``, optional
            otherwise (then it only adds ``rm_reward@10`` to the evaluation).
        state_positions: ``all`` positions with a logged next item, or the ``last`` one per window.
        disable_dropout: no dropout in the policy (TRL's default): at the start policy == reference.
        **kwargs: the shared settings of ``RecModule`` (backbone, lr, init_from, ...).
    """

    takes_reward_model = True

    @classmethod
    def needs_reward_model(cls, init_args):
        return init_args.get("pair_source", "reward_model") == "reward_model"

    def __init__(
        self,
        *args,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        label_smoothing: float = 0.0,
        pair_source: Literal["reward_model", "logged"] = "reward_model",
        reward_model: str | None = None,
        state_positions: Literal["all", "last"] = "all",
        disable_dropout: bool = True,
        **kwargs,
    ) -> None:
        if not beta > 0:
            raise RecpostError(f"model.beta must be > 0 (got {beta}); TRL's default is 0.1")
        if loss_type not in ("sigmoid", "ipo"):
            raise RecpostError(f"model.loss_type must be sigmoid or ipo (got {loss_type!r})")
        if not 0 <= label_smoothing < 0.5:
            raise RecpostError(f"model.label_smoothing must be in [0, 0.5) (got {label_smoothing})")
        if pair_source not in ("reward_model", "logged"):
            raise RecpostError(f"model.pair_source must be reward_model or logged (got {pair_source!r})")
        if state_positions not in ("all", "last"):
            raise RecpostError(f"model.state_positions must be all or last (got {state_positions!r})")
        if pair_source == "reward_model" and not reward_model:
            raise RecpostError(
                "DPO with pair_source: reward_model needs model.reward_model (the best.ckpt of `recpost fit "
                "--config <pretrain.yaml> --config configs/method/reward_model.yaml`), or use pair_source: logged"
            )
        if pair_source == "logged" and state_positions == "last":
            raise RecpostError("DPO with pair_source: logged needs state_positions: all (the last position has no later item)")
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(
            "beta", "loss_type", "label_smoothing", "pair_source", "reward_model", "state_positions", "disable_dropout"
        )
        if disable_dropout:
            turn_off_dropout(self.backbone)
        self.hold_frozen("reference", frozen_copy(self.backbone))
        if reward_model:
            self.hold_frozen("reward_model", self.load_reward_model(reward_model, "model.reward_model"))

    @torch.no_grad()
    def _pairs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(states [B, L] with a pair, chosen [P], rejected [P])``, pairs in row-major state order."""
        hp = self.hparams
        items, ratings = batch["input_items"], batch["input_ratings"]
        states = state_positions(batch, hp.state_positions)
        if hp.pair_source == "logged":
            seen = prefix_history_mask(items, hp.n_items) if hp.mask_history else None
            chosen, rejected, valid = logged_pairs(batch["target_items"], batch["target_ratings"], states, seen)
            states = states & valid
            return states, chosen[states], rejected[states]
        ref, _ = state_log_probs(self._frozen["reference"], items, ratings, states, hp.mask_history)  # [N, V + 1]
        two = sample_items(ref, 2, replacement=False)  # [N, 2]
        rewards = self._frozen["reward_model"].rewards_at(items, ratings, states).gather(1, two)  # [N, 2]
        keep = rewards[:, 0] != rewards[:, 1]  # exact ties carry no preference
        first = rewards[:, 0] > rewards[:, 1]
        chosen, rejected = torch.where(first, two[:, 0], two[:, 1]), torch.where(first, two[:, 1], two[:, 0])
        kept = torch.zeros_like(states)
        kept[states] = keep
        return kept, chosen[keep], rejected[keep]

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        items, ratings = batch["input_items"], batch["input_ratings"]
        n_states = int(state_positions(batch, hp.state_positions).sum())
        states, chosen, rejected = self._pairs(batch)
        logp, _ = state_log_probs(self.backbone, items, ratings, states, hp.mask_history)  # [P, V + 1]
        with torch.no_grad():
            ref, _ = state_log_probs(self._frozen["reference"], items, ratings, states, hp.mask_history)
        pair = torch.stack([chosen, rejected], dim=1)  # [P, 2]
        policy, reference = logp.gather(1, pair), ref.gather(1, pair)  # [P, 2]
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], hp.beta, hp.loss_type, hp.label_smoothing
        )
        # No pair in this batch (tiny data): a zero loss that still reaches every parameter (DDP needs it).
        loss = losses.mean() if len(losses) else logp.sum() * 0.0
        logs = {"pairs/kept": torch.tensor(len(losses) / max(n_states, 1))}
        if len(losses):
            logs.update({
                "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "logps/chosen": policy[:, 0].detach().mean(), "logps/rejected": policy[:, 1].detach().mean(),
            })
        return loss, logs

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """As the base, but the diagnostics keep TRL's names (``rewards/chosen``, not ``train/...``)."""
        loss, logs = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise RecpostError(f"DPO loss became {loss.item()} at step {self.global_step}; lower model.lr or raise beta")
        batch_size = batch["input_items"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(logs, batch_size=batch_size)
        return loss
