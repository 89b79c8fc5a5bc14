"""DPO (and IPO) on item pairs per state, against a frozen reference (the initial policy).

A pair at a state (a position of a training window, its history masked) is a chosen and a rejected
item; the loss pushes the policy's log-ratio to the reference up for the chosen one (TRL's DPOTrainer):

- ``loss_type: sigmoid``: ``-log sigmoid(beta * margin)`` (with ``label_smoothing`` eps:
  ``-(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)``, cDPO);
- ``loss_type: ipo``: ``(margin - 1 / (2 beta))^2``;

where ``margin = (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))``.

Pairs (``pair_source``):

- ``reward_model``: two distinct items sampled at the state, ranked by the frozen reward model (exact
  ties skipped). ``pair_policy`` says which policy samples them: the frozen ``reference`` (the offline
  RLHF recipe, where the RM can be hacked) or the ``current`` policy at every training step, without
  gradient and without dropout (online DPO, as Chidambaram et al. (2026) ran it: the pairs follow the
  policy as it moves, the loss is still taken against the frozen reference);
- ``logged``: the logged next item and another item the same user rated later in the same window
  (chosen uniformly among those with a different rating and not in the state's history, earlier
  windows included); the higher-rated one is chosen. No reward model; needs ``state_positions: all``.

With ``reward_ensemble`` (K >= 2 RewardModel checkpoints; RS-DPO, the baseline of A-SFT, the predecessor
paper) the sampled pairs are ranked by the ensemble's mean and kept only where the ensemble separates
them: with ``m`` the mean and ``s`` the standard deviation over the K models (Bessel-corrected,
``s = sqrt(sum_k (r_k - m)^2 / (K - 1))``) of each item's predicted rating, a pair is kept when
``m_chosen - z s_chosen > m_rejected + z s_rejected`` (strictly; ``z = ensemble_filter_z``): the chosen
item's lower bound above the rejected one's upper bound. ``z = 0`` keeps every pair whose means differ.

Logged per batch (TRL's names and definitions): ``rewards/chosen`` and ``rewards/rejected``
(``beta * (log pi - log pi_ref)``), ``rewards/margins`` (their difference), ``rewards/accuracies``
(share of pairs with chosen > rejected), ``logps/chosen``, ``logps/rejected``, and ``pairs/kept``
(share of states that gave a pair: a pair, not a tie, and with an ensemble, a separated pair).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from recpost.core.batch import TrainBatch
from recpost.core.errors import RecpostError
from recpost.methods.checks import in_interval, one_of, positive, require
from recpost.methods.catalog import catalog_logsumexp, sample_from_catalog
from recpost.methods.policy_base import PolicyModule
from recpost.models import RatingModel

LossType = Literal["sigmoid", "ipo"]
PairSource = Literal["reward_model", "logged"]
PairPolicy = Literal["reference", "current"]


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


def ensemble_pairs(two: torch.Tensor, rewards: torch.Tensor, z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ranked by the mean of an ensemble of reward models, kept where its bounds separate them.

    ``two [N, 2]`` items per state and their predicted ratings under each of ``K >= 2`` models
    ``rewards [K, N, 2]``; with ``m`` and ``s`` their mean and Bessel-corrected standard deviation over the
    models, the item with the larger ``m`` is chosen and the pair kept when
    ``m_chosen - z s_chosen > m_rejected + z s_rejected``. Equal means are never kept. Returns
    ``(pairs [N, 2] (chosen, rejected), keep [N] bool)``.
    """
    mean, std = rewards.mean(dim=0), rewards.std(dim=0, correction=1)  # [N, 2]
    first = mean[:, 0] > mean[:, 1]  # [N]
    order = torch.stack([(~first).long(), first.long()], dim=1)  # [N, 2]: column of (chosen, rejected)
    pairs, mean, std = two.gather(1, order), mean.gather(1, order), std.gather(1, order)
    keep = mean[:, 0] - z * std[:, 0] > mean[:, 1] + z * std[:, 1]
    return pairs, keep


class DPO(PolicyModule):
    """Direct preference optimisation of the next-item policy on item pairs.

    Args:
        beta: inverse temperature of the implicit reward (TRL's default 0.1); > 0.
        loss_type: ``sigmoid`` (DPO) or ``ipo``.
        label_smoothing: cDPO's assumed share of flipped labels, in [0, 0.5) (sigmoid only).
        pair_source: ``reward_model`` (two sampled items ranked by the RM) or ``logged`` ratings.
        pair_policy: which policy samples the RM's pairs: the frozen ``reference`` or the ``current``
            policy at each step (online DPO; ``configs/method/online_dpo.yaml``).
        reward_ensemble: K >= 2 RewardModel checkpoints (e.g. seeds) that rank the sampled pairs by their
            mean and keep only the pairs they separate (RS-DPO; ``configs/method/rs_dpo.yaml``); then
            ``reward_model`` is optional (it only adds ``rm_reward@10`` to the evaluation).
        ensemble_filter_z: the width of the ensemble's bounds, ``mean +- z * std``, in standard deviations
            over the K models; >= 0 (0: rank by the mean, keep every pair whose means differ).
        **kwargs: the shared settings of ``PolicyModule`` (``reward_model``: required for
            ``pair_source: reward_model`` without a ``reward_ensemble``, optional otherwise (then it only adds
            ``rm_reward@10`` to the evaluation); state_positions, disable_dropout) and ``RecModule``
            (backbone, lr, init_from, ...).
    """

    divergence_hint = "lower model.lr or raise model.beta"

    @classmethod
    def needs_reward_model(cls, init_args) -> bool:
        return init_args.get("pair_source", "reward_model") == "reward_model" and not init_args.get("reward_ensemble")

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        positive("beta", s["beta"], "TRL's default is 0.1")
        one_of("loss_type", s["loss_type"], get_args(LossType))
        in_interval("label_smoothing", s["label_smoothing"], 0.0, 0.5)
        one_of("pair_source", s["pair_source"], get_args(PairSource))
        one_of("pair_policy", s["pair_policy"], get_args(PairPolicy))
        in_interval("ensemble_filter_z", s["ensemble_filter_z"], 0.0, math.inf, "e.g. 1.0 (one standard deviation)")
        ensemble = s["reward_ensemble"]
        require(ensemble is None or isinstance(ensemble, (list, tuple)),
                f"model.reward_ensemble must be a list of RewardModel checkpoints (got {ensemble!r}); "
                "e.g. --model.init_args.reward_ensemble '[rm0.ckpt, rm1.ckpt, rm2.ckpt]'")
        require(ensemble is None or len(ensemble) >= 2,  # [] (configs/method/rs_dpo.yaml): asked for, not given
                f"model.reward_ensemble needs at least 2 RewardModel checkpoints (got {len(ensemble or [])}); "
                "train reward models with different seeds (in an experiment: methods.<name>.reward_ensemble: "
                "{count: 3}), or use model.reward_model alone (configs/method/dpo.yaml)")
        paths = [Path(str(p)).expanduser().resolve() for p in ensemble or []]
        twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
        require(twice is None, f"model.reward_ensemble lists {twice} twice; its models must be trained independently "
                               "(different seeds or data), or their spread means nothing")
        require(s["pair_source"] != "reward_model" or bool(s["reward_model"]) or bool(ensemble),
                "DPO with pair_source: reward_model needs model.reward_model (the best.ckpt of `recpost fit "
                "--config <pretrain.yaml> --config configs/method/reward_model.yaml`) or model.reward_ensemble, "
                "or use pair_source: logged")
        require(s["pair_source"] == "reward_model" or s["pair_policy"] == "reference",
                "DPO with pair_policy: current needs pair_source: reward_model (logged pairs are not sampled)")
        require(s["pair_source"] == "reward_model" or not ensemble,
                "DPO with model.reward_ensemble needs pair_source: reward_model (the ensemble ranks and filters "
                "sampled pairs; logged pairs are ranked by their ratings)")
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
        pair_policy: PairPolicy = "reference",
        reward_ensemble: list[str] | None = None,
        ensemble_filter_z: float = 1.0,
        **kwargs,
    ) -> None:
        self.check_settings_once(dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                      pair_source=pair_source, pair_policy=pair_policy, reward_ensemble=reward_ensemble,
                                      ensemble_filter_z=ensemble_filter_z, **kwargs))
        super().__init__(*args, **kwargs)
        # Held like reward_model (frozen, outside the module tree, rebuilt from their checkpoints).
        for k, path in enumerate(reward_ensemble or []):
            self.hold_frozen(f"reward_ensemble.{k}", self.load_reward_model(path, f"model.reward_ensemble[{k}]"))

    @property
    def reward_ensemble(self) -> list[RatingModel]:
        """The frozen reward models of ``reward_ensemble`` (empty without one)."""
        return [self._frozen[f"reward_ensemble.{k}"] for k in range(len(self.hparams.reward_ensemble or []))]

    def _sample_two(self, batch: TrainBatch, states: torch.Tensor, reference_hidden: torch.Tensor,
                    history: torch.Tensor | None) -> torch.Tensor:
        """Two distinct items per state ``[N, 2]`` from the ``pair_policy``: the reference (its hidden vectors
        ``reference_hidden [N, d]`` are already computed) or the current policy, without dropout."""
        if self.hparams.pair_policy == "reference":
            scorer, hidden = self.scorer(reference=True), reference_hidden
        else:
            with self.dropout_off():
                hidden, _ = self.state_hidden(batch, states, with_history=False)  # [N, d]
            scorer = self.scorer()
        return sample_from_catalog(scorer, hidden, history, self.n_columns, self.chunk_size, k=2, replacement=False)

    def _rank(self, batch: TrainBatch, states: torch.Tensor, two: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pairs [N, 2] (chosen, rejected), keep [N] bool)`` of the sampled ``two [N, 2]``: by the reward
        model (exact ties carry no preference) or by the ensemble's filter (:func:`ensemble_pairs`)."""
        ensemble = self.reward_ensemble
        if ensemble:
            timestamps = batch.get("input_timestamps")
            rewards = torch.stack([rm.rewards_at(batch["input_items"], batch["input_ratings"], states, two, timestamps)
                                   for rm in ensemble])  # [K, N, 2]
            return ensemble_pairs(two, rewards.float(), self.hparams.ensemble_filter_z)
        rewards = self.rewards(batch, states, two)  # [N, 2]
        return torch.where((rewards[:, 0] > rewards[:, 1])[:, None], two, two.flip(1)), rewards[:, 0] != rewards[:, 1]

    @torch.no_grad()
    def _pairs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(states [B, L] with a pair, pairs [P, 2] (chosen, rejected), their reference log-probs [P, 2])``,
        pairs in row-major state order. One reference pass serves both the sampling of reference pairs and
        the reference term of the loss; the catalog is scored ``score_chunk_size`` items at a time."""
        hp = self.hparams
        states = self.states(batch)
        if hp.pair_source == "logged":
            seen_at = first_seen(batch["next_items"], batch["input_items"], batch["earlier_items"])
            chosen, rejected, valid = logged_pairs(batch["next_items"], batch["next_ratings"], states,
                                                   seen_at if hp.mask_history else None)
            states = states & valid
            pairs = torch.stack([chosen[states], rejected[states]], dim=1)  # [P, 2]
            hidden, history = self.state_hidden(batch, states, reference=True)  # [P, d]
        else:
            hidden, history = self.state_hidden(batch, states, reference=True)  # [N, d]
            two = self._sample_two(batch, states, hidden, history)  # [N, 2]
            pairs, keep = self._rank(batch, states, two)  # [N, 2], [N]
            pairs = pairs[keep]  # [P, 2]
            kept = torch.zeros_like(states)
            kept[states] = keep
            states, hidden, history = kept, hidden[keep], history[keep] if history is not None else None
        lse = catalog_logsumexp(self.scorer(reference=True), hidden, history, self.n_columns, self.chunk_size)
        return states, pairs, self.reference.score(hidden, pairs) - lse[:, None]

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        n_states = int(self.states(batch).sum())
        states, pair, reference = self._pairs(batch)  # [B, L], [P, 2], [P, 2]
        hidden, history = self.state_hidden(batch, states)  # [P, d]
        # The margins need only the two items' logits: each state's log-normaliser cancels in
        # (log pi(c) - log pi(r)). It is computed without gradient, for the log-probs TRL logs.
        with torch.no_grad():
            lse = catalog_logsumexp(self.scorer(), hidden, history, self.n_columns, self.chunk_size)  # [P]
        policy = self.backbone.score(hidden, pair) - lse[:, None]  # [P, 2]
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], hp.beta, hp.loss_type, hp.label_smoothing
        )
        # No pair in this batch (tiny data): a zero loss that still reaches every parameter (DDP needs it).
        loss = losses.mean() if len(losses) else sum(p.sum() for p in self.backbone.parameters()) * 0.0
        logs = {"pairs/kept": torch.tensor(len(losses) / max(n_states, 1))}
        if len(losses):
            logs.update({
                "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "logps/chosen": policy[:, 0].detach().mean(), "logps/rejected": policy[:, 1].detach().mean(),
            })
        return loss, logs
