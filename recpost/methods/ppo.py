"""PPO against a learned reward model, in the contextual-bandit view: state = history, action = one item.

Each training batch is one rollout (TRL's PPO / RLOO / GRPO, with one-token "completions"):

1. **States**: every position of the training windows that has a logged next item
   (``state_positions: all``, the states SFT and exp-weighted SFT train on) or only the newest one
   (``last``). The history a state has had is masked: it is never sampled.
2. **Samples**: ``k`` items per state from the current policy, i.i.d. (``replacement: true``, like TRL's
   k completions per prompt, which keeps the group baseline unbiased) or k distinct items by
   Gumbel-top-k (``false``).
3. **Reward and KL**: the frozen reward model's predicted rating. The KL penalty to the reference goes
   where its expected gradient is that of ``kl_coef * KL(pi || pi_ref)`` (``policy_gradient``'s
   docstring derives each; ``tests/test_kl_gradient.py`` checks them): ``exact`` (default), summed over
   the whole catalog, in the loss (no sampling noise; a KL constant per state would cancel in the group
   baseline, so it cannot go into the reward); ``k1``, subtracted from each sample's reward as TRL's
   PPO does (``reward - kl_coef * (log pi - log pi_ref)``); ``k3``, TRL GRPO's estimator, in the loss
   weighted by the importance ratio (``mean(pi / pi_old * k3)``). k3 in the reward is not offered: its
   expected gradient is ``grad KL(pi || pi_ref) - grad KL(pi_ref || pi)``.
4. **Advantage**: ``baseline: group`` subtracts the mean reward of the state's *other* k - 1 samples
   (RLOO, unbiased); ``scale_rewards: group | batch`` also divides by the group's / batch's reward std
   (GRPO). ``baseline: value`` subtracts a learned value ``V(s)`` (a linear head on the policy's state,
   clipped value loss weighted by ``vf_coef``, as TRL's PPO).
5. **Updates**: ``ppo_epochs`` passes over ``num_minibatches`` minibatches of windows, clipped surrogate
   ``max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range))`` with ``r = pi / pi_old``, optional entropy
   bonus, gradient norm clipped at ``max_grad_norm``. The first minibatch of a rollout is computed
   exactly as in the rollout (same windows, no dropout), so its ratio is exactly 1.
6. **Adaptive KL** (``target_kl``): after each rollout ``kl_coef *= 1 + clip(KL / target_kl - 1, -0.2,
   0.2) * n_states / kl_horizon`` (Ziegler et al., 2019; TRL's former ``AdaptiveKLController``).

Logged each rollout (TRL's names): ``objective/rm_reward`` (mean RM reward of the samples),
``objective/kl`` (exact KL of the policy to the reference, mean over states, before the update),
``objective/entropy`` (exact, over the catalog), ``objective/non_score_reward`` (``-kl_coef * kl``),
``objective/rlhf_reward``, ``objective/kl_coef``, ``policy/clipfrac``, ``policy/approxkl``
(``0.5 * mean((log pi - log pi_old)^2)``), ``policy/ratio``, ``loss/policy``, and with a value
baseline ``loss/value``, ``value/clipfrac`` (TRL's ``val/clipfrac``, renamed: ``val/`` is validation
here). ``trainer.max_steps`` counts optimiser steps: ``ppo_epochs * num_minibatches`` per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from recpost.core.batch import TrainBatch
from recpost.methods.base import check_finite
from recpost.methods.checks import at_least, non_negative, one_of, optional, positive, require
from recpost.methods.catalog import catalog_entropy, catalog_logsumexp, sample_from_catalog
from recpost.methods.policy import entropy, exact_kl, kl_k1, kl_k3, sample_items, state_history
from recpost.methods.policy_base import PolicyModule
from recpost.methods.policy_gradient import (
    clipped_surrogate, group_advantages, kl_loss_term, kl_penalized_rewards, scale_advantages,
)
from recpost.models.fused_ce import row_blocks
from recpost.models.fused_policy import block_log_probs, history_index

KLEstimator = Literal["exact", "k1", "k3"]
Baseline = Literal["group", "value"]
ScaleRewards = Literal["none", "group", "batch"]

# Ziegler et al.'s adaptive KL controller clips the proportional error to this range.
KL_ERROR_CLIP = 0.2


@dataclass
class Rollout:
    """What one rollout fixes for its ``ppo_epochs`` of updates (N states, k samples each)."""

    states: torch.Tensor  # [B, L] bool: positions used as states
    index: torch.Tensor  # [B, L] long: row of each state in the [N, ...] tensors (-1 elsewhere)
    actions: torch.Tensor  # [N, k] sampled items
    logp_old: torch.Tensor  # [N, k] their log-probability under the policy at rollout time
    advantages: torch.Tensor  # [N, k]
    returns: torch.Tensor  # [N, k] value targets (the rewards, KL-shaped for k1/k3)
    values: torch.Tensor | None  # [N] V_old(s) (value baseline only)
    ref_logp: torch.Tensor | None  # [N, V + 1] reference log-probs (exact KL only)
    ref_logp_a: torch.Tensor  # [N, k] the samples' reference log-probs (the k3 loss term)
    stats: dict[str, torch.Tensor]
    history: torch.Tensor | None = None  # [N, H + L] what the user had by each state (mask_history), built once


class PPO(PolicyModule):
    """PPO of the next-item policy against a frozen reward model, with a KL penalty to the initial policy.

    Args:
        k: items sampled per state (TRL GRPO's ``num_generations``).
        kl_coef: weight of ``KL(pi || pi_ref)`` (reward units, i.e. stars, per nat); the start value
            when ``target_kl`` is set.
        kl_estimator: ``exact`` (over the catalog, in the loss), TRL PPO's sampled ``k1`` (subtracted from
            each sample's reward) or TRL GRPO's sampled ``k3`` (in the loss, weighted by ``pi / pi_old``).
        baseline: ``group`` (RLOO leave-one-out mean of the k samples) or ``value`` (learned V(s)).
        scale_rewards: divide advantages by the reward std of the ``group`` or the ``batch``; ``none``.
        clip_range: PPO's epsilon; the ratio is clipped to ``[1 - clip_range, 1 + clip_range]``.
        ppo_epochs: optimisation passes over each rollout (TRL's ``num_ppo_epochs``).
        num_minibatches: minibatches (of windows) per pass (TRL's ``num_mini_batches``).
        entropy_coef: weight of an entropy bonus (0: none).
        vf_coef: weight of the value loss (value baseline).
        cliprange_value: clip of the value update around V_old (value baseline).
        target_kl: adaptive KL controller's target (nats per state); ``null``: fixed ``kl_coef``.
        kl_horizon: adaptive controller's horizon (states).
        max_grad_norm: clip the gradient norm of each update (``null``: no clipping).
        replacement: sample the k items i.i.d. (``true``) or k distinct items (``false``).
        **kwargs: the shared settings of ``PolicyModule`` (reward_model, required here; state_positions,
            disable_dropout) and ``RecModule`` (backbone, lr, init_from, ...).
    """

    divergence_hint = "lower model.lr or model.kl_coef"

    @classmethod
    def check_settings(cls, **settings) -> None:
        s = {**cls.setting_defaults(), **settings}
        require(bool(s["reward_model"]), "PPO needs model.reward_model: the best.ckpt of `recpost fit --config "
                "<pretrain.yaml> --config configs/method/reward_model.yaml`")
        one_of("kl_estimator", s["kl_estimator"], get_args(KLEstimator))
        one_of("baseline", s["baseline"], get_args(Baseline))
        one_of("scale_rewards", s["scale_rewards"], get_args(ScaleRewards))
        require(s["kl_estimator"] != "k1" or s["scale_rewards"] == "none",
                f"model.kl_estimator: k1 puts the KL in the reward, which scale_rewards: {s['scale_rewards']} would "
                "divide by the reward std (the KL weight would no longer be kl_coef); use kl_estimator: k3 or exact "
                "with it")
        at_least("k", s["k"], 1)
        require(s["baseline"] != "group" or s["k"] >= 2,
                f"model.k must be >= 2 with baseline: group (got {s['k']}); the baseline is the other samples' mean")
        non_negative("kl_coef", s["kl_coef"], "0 disables the KL penalty")
        positive("clip_range", s["clip_range"], "TRL's default is 0.2")
        for name in ("ppo_epochs", "num_minibatches", "kl_horizon"):
            at_least(name, s[name], 1)
        non_negative("entropy_coef", s["entropy_coef"])
        non_negative("vf_coef", s["vf_coef"])
        positive("cliprange_value", s["cliprange_value"])
        optional(positive, "target_kl", s["target_kl"])
        optional(positive, "max_grad_norm", s["max_grad_norm"])
        if s["score_chunk_size"] is not None:  # the catalog never held whole: no exact sums over it
            require(s["kl_estimator"] != "exact", "model.kl_estimator: exact sums over the whole catalog; with "
                    "model.score_chunk_size set, use k3 (or k1), or set score_chunk_size: null")
            require(s["entropy_coef"] == 0, "model.entropy_coef needs the whole catalog; with model.score_chunk_size "
                    "set, use entropy_coef: 0 (the entropy is still logged)")
        super().check_settings(**settings)

    def __init__(
        self,
        *args,
        k: int = 8,
        kl_coef: float = 0.05,
        kl_estimator: KLEstimator = "exact",
        baseline: Baseline = "group",
        scale_rewards: ScaleRewards = "none",
        clip_range: float = 0.2,
        ppo_epochs: int = 4,
        num_minibatches: int = 1,
        entropy_coef: float = 0.0,
        vf_coef: float = 0.1,
        cliprange_value: float = 0.2,
        target_kl: float | None = None,
        kl_horizon: int = 10000,
        max_grad_norm: float | None = 1.0,
        replacement: bool = True,
        **kwargs,
    ) -> None:
        self.check_settings_once(dict(
            k=k, kl_coef=kl_coef, kl_estimator=kl_estimator, baseline=baseline, scale_rewards=scale_rewards,
            clip_range=clip_range, ppo_epochs=ppo_epochs, num_minibatches=num_minibatches, entropy_coef=entropy_coef,
            vf_coef=vf_coef, cliprange_value=cliprange_value, target_kl=target_kl, kl_horizon=kl_horizon,
            max_grad_norm=max_grad_norm, replacement=replacement, **kwargs))
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        d_model = self.backbone.item_weights().shape[1]
        self.value_head = nn.Linear(d_model, 1) if baseline == "value" else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
        # The current KL coefficient (moves with target_kl), saved with the policy.
        self.register_buffer("kl_coef_value", torch.tensor(float(kl_coef)))
        if self.value_head is not None:  # V's bias is set from the first rollout's rewards
            self.register_buffer("value_initialized", torch.tensor(False))

    def optimizer_steps_per_batch(self) -> int:
        """Each rollout (training batch) takes ``ppo_epochs x num_minibatches`` optimiser steps."""
        return self.hparams.ppo_epochs * self.hparams.num_minibatches

    # ----------------------------------------------------------------------------------- rollout
    def _minibatches(self, n_rows: int, shuffle: bool, device: torch.device) -> list[torch.Tensor | None]:
        """Row (window) indices of each minibatch: in order for the rollout and the first pass, shuffled after.
        One minibatch is the whole batch (``None``: all rows, in order, nothing to gather)."""
        if self.hparams.num_minibatches == 1:
            return [None]
        order = torch.randperm(n_rows) if shuffle else torch.arange(n_rows)
        return [rows.to(device) for rows in order.tensor_split(self.hparams.num_minibatches) if len(rows)]

    @staticmethod
    def _state_rows(roll: Rollout, rows: torch.Tensor | None) -> torch.Tensor | slice:
        """The rollout rows (states) of the windows ``rows``: all of them, in order, for ``None``."""
        return slice(None) if rows is None else roll.index[rows][roll.states[rows]]

    @torch.no_grad()
    def _blockwise_rollout(self, batch: TrainBatch, states: torch.Tensor, rows: torch.Tensor | None,
                           history: torch.Tensor | None):
        """A rollout's per-state pieces a block of states at a time over the whole catalog: ``(hidden [m, d],
        actions [m, k], their log-probs under the policy and the reference [m, k], exact KL [m], entropy [m],
        the reference log-probs [m, V + 1])``. The policy's log-probs are those of the first update's
        :meth:`Backbone.policy_terms` (the same blocks, the same arithmetic), so its ratio is exactly 1."""
        hp = self.hparams
        hidden, _ = self.state_hidden(batch, states, rows, with_history=False)
        ref_hidden, _ = self.state_hidden(batch, states, rows, reference=True, with_history=False)
        m, device = hidden.shape[0], hidden.device
        actions = torch.empty(m, hp.k, dtype=torch.long, device=device)
        logp_a, ref_a = torch.empty(m, hp.k, device=device), torch.empty(m, hp.k, device=device)
        kl, ent = torch.empty(m, device=device), torch.empty(m, device=device)
        ref_full = torch.empty(m, self.n_columns, device=device) if hp.kl_estimator == "exact" else None
        with torch.autocast(device_type=device.type, enabled=False):
            h, w = self.backbone.scoring_inputs(hidden)
            ref_h, ref_w = self.reference.scoring_inputs(ref_hidden)
            for b in row_blocks(m, self.n_columns):
                hist = history_index(history[b] if history is not None else None, self.n_columns)
                logp, _ = block_log_probs(h[b], w, hist)  # [r, V + 1]
                ref, _ = block_log_probs(ref_h[b], ref_w, hist)
                actions[b] = a = sample_items(logp, hp.k, replacement=hp.replacement)  # [r, k]
                logp_a[b], ref_a[b] = logp.gather(1, a), ref.gather(1, a)
                kl[b], ent[b] = exact_kl(logp, ref), entropy(logp)
                if ref_full is not None:
                    ref_full[b] = ref
        return hidden, actions, logp_a, ref_a, kl, ent, ref_full

    @torch.no_grad()
    def _chunked_rollout(self, batch: TrainBatch, states: torch.Tensor, rows: torch.Tensor | None,
                         history: torch.Tensor | None):
        """A rollout's per-state pieces a chunk of the catalog at a time: ``(hidden [m, d], actions [m, k],
        their log-probs under the policy and the reference [m, k], the policy's entropy [m])``."""
        hp = self.hparams
        hidden, _ = self.state_hidden(batch, states, rows, with_history=False)
        lse = catalog_logsumexp(self.scorer(), hidden, history, self.n_columns, self.chunk_size)
        actions = sample_from_catalog(self.scorer(), hidden, history, self.n_columns, self.chunk_size, hp.k,
                                      hp.replacement, lse)
        ref_hidden, _ = self.state_hidden(batch, states, rows, reference=True, with_history=False)
        ref_lse = catalog_logsumexp(self.scorer(reference=True), ref_hidden, history, self.n_columns, self.chunk_size)
        ent = catalog_entropy(self.scorer(), hidden, history, self.n_columns, self.chunk_size, lse)
        return (hidden, actions, self.backbone.score(hidden, actions) - lse[:, None],
                self.reference.score(ref_hidden, actions) - ref_lse[:, None], ent)

    def _value(self, hidden: torch.Tensor) -> torch.Tensor:
        """``V(s)`` ``[N, d] -> [N]`` in fp32 whatever the autocast: a value in stars, which bf16 would
        round to steps of 1/64 star near 3 (the baseline and the value loss need finer)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    @torch.no_grad()
    def rollout(self, batch: TrainBatch) -> Rollout:
        """Sample k items per state, score them with the RM, and fix the advantages (see the module doc)."""
        hp = self.hparams
        states = self.states(batch)  # [B, L]
        n = int(states.sum())
        index = torch.full(states.shape, -1, dtype=torch.long, device=states.device)
        index[states] = torch.arange(n, device=states.device)
        actions = torch.empty(n, hp.k, dtype=torch.long, device=states.device)
        logp_old, ref_a = torch.empty(n, hp.k, device=states.device), torch.empty(n, hp.k, device=states.device)
        kl, ent = torch.empty(n, device=states.device), torch.empty(n, device=states.device)
        d_model = self.backbone.item_weights().shape[1]
        hidden_all = torch.empty(n, d_model, device=states.device) if self.value_head is not None else None
        exact = hp.kl_estimator == "exact"
        ref_full = torch.empty(n, hp.n_items + 1, device=states.device) if exact and hp.num_minibatches > 1 else None
        # What the user had by each state, built once for the rollout and all its updates (rows in state order)
        history = state_history(batch["input_items"], states, batch["earlier_items"]) if hp.mask_history else None
        # The same windows, in the same order, as the first update's minibatches: its ratio is exactly 1.
        for rows in self._minibatches(len(states), shuffle=False, device=states.device):
            idx = slice(None) if rows is None else index[rows][states[rows]]
            had = None if history is None else history[idx]
            if hp.score_chunk_size is None:
                hidden, a, logp_a, ref_logp_a, kl[idx], ent[idx], ref = self._blockwise_rollout(
                    batch, states, rows, had)
                actions[idx], logp_old[idx], ref_a[idx] = a, logp_a, ref_logp_a
                if exact:  # one minibatch: the reference log-probs are kept as they are, no copy
                    ref_full = ref if rows is None else ref_full.index_copy_(0, idx, ref)
            else:  # a chunk of the catalog at a time: no [m, V + 1] tensor (sampled KL estimators only)
                hidden, a, logp_a, ref_logp_a, ent[idx] = self._chunked_rollout(batch, states, rows, had)
                actions[idx], logp_old[idx], ref_a[idx] = a, logp_a, ref_logp_a
                kl[idx] = (kl_k1 if hp.kl_estimator == "k1" else kl_k3)(logp_a, ref_logp_a).mean(dim=1)
            if hidden_all is not None:
                hidden_all[idx] = hidden.float()
        rm_rewards = self.rewards(batch, states, actions)  # [N, k]: only the sampled items are scored
        coef = self.kl_coef_value
        returns = kl_penalized_rewards(rm_rewards, logp_old, ref_a, coef, hp.kl_estimator)
        values = None
        if self.value_head is None:
            advantages = group_advantages(returns, hp.scale_rewards)
        else:
            if not bool(self.value_initialized):  # start V at the mean reward, not at 0 stars
                self.value_head.bias.fill_(returns.mean())
                self.value_initialized.fill_(True)
            values = self._value(hidden_all)  # [N]
            advantages = scale_advantages(returns - values[:, None], returns, hp.scale_rewards)
        mean_kl = kl.mean()
        stats = {
            "objective/rm_reward": rm_rewards.mean(),
            "objective/kl": mean_kl,
            "objective/entropy": ent.mean(),
            "objective/non_score_reward": -coef * mean_kl,
            "objective/rlhf_reward": rm_rewards.mean() - coef * mean_kl,
            "objective/kl_coef": coef.clone(),
        }
        return Rollout(states, index, actions, logp_old, advantages, returns, values, ref_full, ref_a, stats, history)

    # ----------------------------------------------------------------------------------- update
    def minibatch_loss(
        self, batch: TrainBatch, roll: Rollout, rows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Loss of one update on the windows ``rows``; returns ``(loss, diagnostics, ratio [m, k])``."""
        hp = self.hparams
        idx = self._state_rows(roll, rows)
        hidden, _ = self.state_hidden(batch, roll.states, rows, with_history=False)  # [m, d]
        history = None if roll.history is None else roll.history[idx]
        if hp.score_chunk_size is None:  # a block of states at a time: no [m, V + 1] tensor but the rollout's reference
            ref_logp = roll.ref_logp[idx] if roll.ref_logp is not None else None
            logp_a, kl, ent = self.backbone.policy_terms(hidden, history, roll.actions[idx], ref_logp,
                                                         with_entropy=hp.entropy_coef > 0)
        else:
            lse = catalog_logsumexp(self.scorer(), hidden, history, self.n_columns, self.chunk_size)  # [m]
            logp_a = self.backbone.score(hidden, roll.actions[idx]) - lse[:, None]
        logp_old = roll.logp_old[idx]
        loss, stats = clipped_surrogate(logp_a, logp_old, roll.advantages[idx], hp.clip_range)
        stats["loss/policy"] = loss.detach()
        if hp.entropy_coef > 0:
            loss = loss - hp.entropy_coef * ent.mean()
        if roll.ref_logp is not None:
            loss = loss + self.kl_coef_value * kl.mean()
        elif hp.kl_estimator == "k3":
            loss = loss + self.kl_coef_value * kl_loss_term(logp_a, logp_old, roll.ref_logp_a[idx])
        if self.value_head is not None:
            v_old, target = roll.values[idx], roll.returns[idx]  # [m], [m, k]
            v = self._value(hidden)  # [m]
            v_clipped = v_old + (v - v_old).clamp(-hp.cliprange_value, hp.cliprange_value)
            unclipped, clipped = (v[:, None] - target) ** 2, (v_clipped[:, None] - target) ** 2
            value_loss = 0.5 * torch.max(unclipped, clipped).mean()
            loss = loss + hp.vf_coef * value_loss
            stats["loss/value"] = value_loss.detach()
            stats["value/clipfrac"] = (clipped > unclipped).float().mean()
        ratio = torch.exp(logp_a - logp_old).detach()
        return loss, stats, ratio

    def training_step(self, batch: TrainBatch, batch_idx: int) -> None:
        hp = self.hparams
        opt = self.optimizers()
        scheduler = self.lr_schedulers()
        roll = self.rollout(batch)
        losses, stats = [], []
        for epoch in range(hp.ppo_epochs):
            for rows in self._minibatches(len(roll.states), shuffle=epoch > 0, device=roll.states.device):
                loss, s, _ = self.minibatch_loss(batch, roll, rows)
                check_finite(loss, self.global_step, self.divergence_hint)
                opt.zero_grad()
                self.manual_backward(loss)
                if hp.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                if scheduler is not None:  # sized in optimiser steps (total_optimizer_steps), stepped per step
                    scheduler.step()
                losses.append(loss.detach())
                stats.append(s)
        self._adapt_kl_coef(roll.stats["objective/kl"], int(roll.states.sum()))
        logs = {**roll.stats, **{k: torch.stack([s[k] for s in stats]).mean() for k in stats[0]}}
        self.log_training(torch.stack(losses).mean(), logs, batch)

    def _adapt_kl_coef(self, kl: torch.Tensor, n_states: int) -> None:
        target = self.hparams.target_kl
        if target is None:
            return
        if self._trainer is not None and self.trainer.world_size > 1:
            kl = self.trainer.strategy.reduce(kl, reduce_op="mean")  # every rank keeps the same kl_coef
        error = (kl / target - 1.0).clamp(-KL_ERROR_CLIP, KL_ERROR_CLIP)
        self.kl_coef_value.mul_(1.0 + error * n_states / self.hparams.kl_horizon)
