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
  (chosen uniformly among those with a different rating and not in the state's history, earlier
  windows included); the higher-rated one is chosen. No reward model; needs ``state_positions: all``.

Logged per batch (TRL's names and definitions): ``rewards/chosen`` and ``rewards/rejected``
(``beta * (log pi - log pi_ref)``), ``rewards/margins`` (their difference), ``rewards/accuracies``
(share of pairs with chosen > rejected), ``logps/chosen``, ``logps/rejected``, and ``pairs/kept``
(share of states that gave a pair).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from recpost.batch import TrainBatch
from recpost.errors import RecpostError
from recpost.methods.checks import in_interval, one_of, positive, require
from recpost.methods.policy import sample_items
from recpost.methods.policy_base import PolicyModule

LossType = Literal["sigmoid", "ipo"]
PairSource = Literal["reward_model", "logged"]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: LossType = "sigmoid",
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


def first_seen(next_items: torch.Tensor, input_items: torch.Tensor, earlier: torch.Tensor | None = None) -> torch.Tensor:
    """For each window position ``s``, when the user first had the item logged after it,
    ``next_items[b, s]``: the first input position holding it, ``-1`` if the user had it before the
    window (``earlier [B, H]``), ``L`` if never before. Inputs ``[B, L]`` -> ``[B, L]`` long. State
    ``(b, t)`` has had item ``next_items[b, s]`` exactly when ``first_seen[b, s] <= t``."""
    L = input_items.shape[1]
    real = next_items > 0  # [B, L]
    same = (input_items[:, None, :] == next_items[:, :, None]) & real[:, :, None]  # [B, L(s), L(p)]
    position = torch.where(same.any(-1), same.to(torch.uint8).argmax(-1), L)  # the first matching p
    if earlier is not None and earlier.shape[1]:
        before = (earlier[:, None, :] == next_items[:, :, None]).any(-1) & real  # [B, L]
        position = position.masked_fill(before, -1)
    return position


def logged_pairs(
    next_items: torch.Tensor,
    next_ratings: torch.Tensor,
    states: torch.Tensor,
    seen_at: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs from logged ratings: at each state ``(b, t)``, the logged next item ``next_items[b, t]``
    against a later one ``next_items[b, s]`` (``s > t``) of another rating that the state has not had
    (``seen_at``: :func:`first_seen`; ``None``: no history check), drawn uniformly; the higher rating is
    chosen. A logged item the state already had gives no pair.

    Inputs ``[B, L]``; returns ``(chosen [B, L], rejected [B, L], valid [B, L] bool)``.
    """
    B, L = next_items.shape
    later = torch.ones(L, L, dtype=torch.bool, device=next_items.device).triu(diagonal=1)  # [t, s]: s > t
    other_ratings = next_ratings[:, None, :].expand(B, L, L)
    candidates = later & (next_items[:, None, :] > 0) & (other_ratings != next_ratings[:, :, None])
    candidates &= states[:, :, None]
    if seen_at is not None:
        t = torch.arange(L, device=next_items.device)
        candidates &= seen_at[:, None, :] > t[None, :, None]  # the later item is new at state t
        candidates &= (seen_at > t[None, :])[:, :, None]  # so is the logged one (repeats give no pair)
    noise = torch.rand(B, L, L, generator=generator, device=next_items.device)
    pick = noise.masked_fill(~candidates, -1.0).argmax(dim=-1)  # [B, L]
    other_item, other_rating = next_items.gather(1, pick), next_ratings.gather(1, pick)
    logged_better = next_ratings > other_rating
    chosen = torch.where(logged_better, next_items, other_item)
    rejected = torch.where(logged_better, other_item, next_items)
    return chosen, rejected, candidates.any(dim=-1)


class DPO(PolicyModule):
    """Direct preference optimisation of the next-item policy on item pairs.

    Args:
        beta: inverse temperature of the implicit reward (TRL's default 0.1); > 0.
        loss_type: ``sigmoid`` (DPO) or ``ipo``.
        label_smoothing: cDPO's assumed share of flipped labels, in [0, 0.5) (sigmoid only).
        pair_source: ``reward_model`` (two reference samples ranked by the RM) or ``logged`` ratings.
        **kwargs: the shared settings of ``PolicyModule`` (``reward_model``: required for
            ``pair_source: reward_model``, optional otherwise (then it only adds ``rm_reward@10`` to the
            evaluation); state_positions, disable_dropout) and ``RecModule`` (backbone, lr, init_from, ...).
    """

    divergence_hint = "lower model.lr or raise model.beta"

    @classmethod
    def needs_reward_model(cls, init_args) -> bool:
        return init_args.get("pair_source", "reward_model") == "reward_model"

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        positive("beta", s["beta"], "TRL's default is 0.1")
        one_of("loss_type", s["loss_type"], get_args(LossType))
        in_interval("label_smoothing", s["label_smoothing"], 0.0, 0.5)
        one_of("pair_source", s["pair_source"], get_args(PairSource))
        require(s["pair_source"] != "reward_model" or bool(s["reward_model"]),
                "DPO with pair_source: reward_model needs model.reward_model (the best.ckpt of `recpost fit "
                "--config <pretrain.yaml> --config configs/method/reward_model.yaml`), or use pair_source: logged")
        require(s["pair_source"] != "logged" or s["state_positions"] == "all",
                "DPO with pair_source: logged needs state_positions: all (the last position has no later item)")
        super().check_settings(**settings)

    def __init__(
        self,
        *args,
        beta: float = 0.1,
        loss_type: LossType = "sigmoid",
        label_smoothing: float = 0.0,
        pair_source: PairSource = "reward_model",
        **kwargs,
    ) -> None:
        self.check_settings_once(dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                      pair_source=pair_source, **kwargs))
        super().__init__(*args, **kwargs)

    @torch.no_grad()
    def _pairs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(states [B, L] with a pair, chosen [P], rejected [P])``, pairs in row-major state order."""
        hp = self.hparams
        states = self.states(batch)
        if hp.pair_source == "logged":
            seen_at = first_seen(batch["next_items"], batch["input_items"], batch["earlier_items"])
            chosen, rejected, valid = logged_pairs(batch["next_items"], batch["next_ratings"], states,
                                                   seen_at if hp.mask_history else None)
            states = states & valid
            return states, chosen[states], rejected[states]
        ref, _ = self.log_probs(batch, states, reference=True)  # [N, V + 1]
        two = sample_items(ref, 2, replacement=False)  # [N, 2]
        rewards = self.rewards(batch, states, two)  # [N, 2]
        keep = rewards[:, 0] != rewards[:, 1]  # exact ties carry no preference
        first = rewards[:, 0] > rewards[:, 1]
        chosen, rejected = torch.where(first, two[:, 0], two[:, 1]), torch.where(first, two[:, 1], two[:, 0])
        kept = torch.zeros_like(states)
        kept[states] = keep
        return kept, chosen[keep], rejected[keep]

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        n_states = int(self.states(batch).sum())
        states, chosen, rejected = self._pairs(batch)
        logp, _ = self.log_probs(batch, states)  # [P, V + 1]
        with torch.no_grad():
            ref, _ = self.log_probs(batch, states, reference=True)
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
