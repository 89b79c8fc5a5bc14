"""Pure pieces of the policy-gradient methods (PPO, its GRPO preset): advantages, the clipped surrogate and
where the sampled KL penalty goes, each easy to test by hand. Inputs are ``[N, k]``: N states, k samples each.

Where a KL estimator enters decides whether its expected gradient is the gradient of ``KL(pi || pi_ref)``
(``tests/test_kl_gradient.py`` checks every option by exact enumeration of a small catalog). With
``a ~ pi``, ``g(a) = grad log pi(a)`` and ``E[g] = 0``:

- **k1 in the reward** (TRL's PPO): the surrogate's gradient carries ``E[(log pi - log pi_ref)(a) g(a)]
  = grad KL(pi || pi_ref)`` (at the rollout's policy, where PPO's ratio is 1);
- **k3 in the reward** would carry ``E[k3(a) g(a)] = grad KL(pi || pi_ref) - grad KL(pi_ref || pi)``
  (``E[(pi_ref / pi)(a) g(a)] = sum_a pi_ref(a) g(a)``): the wrong gradient, so it is not offered;
- **k3 in the loss**, TRL GRPO's form, without a weight, has ``E[grad k3(a)] = E[(1 - pi_ref / pi)(a) g(a)]
  = grad KL(pi_ref || pi)``: the reverse KL's gradient. **Weighted by the importance ratio**
  ``pi / pi_old`` (gradient through it; TRL GRPO's ``use_bias_correction_kl``), its expectation under
  ``pi_old`` is ``KL(pi || pi_ref)`` itself for every ``pi``, so its gradient is exact at every update,
  not only the first: the ``k3`` option.
"""

from __future__ import annotations

from typing import Literal

import torch

from recpost.methods.policy import kl_k1, kl_k3

# TRL's epsilon in reward scaling (GRPO's scale_rewards); keeps constant-reward groups finite.
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, scale: Literal["none", "group", "batch"] = "none") -> torch.Tensor:
    """RLOO advantages ``[N, k] -> [N, k]``: each reward minus the mean of the other k - 1 of its state,
    optionally divided by the reward std of the group or of the whole batch (GRPO's ``scale_rewards``).
    GRPO subtracts the mean of all k instead: ``(k - 1) / k`` times these advantages, the same direction."""
    k = rewards.shape[1]
    adv = rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return scale_advantages(adv, rewards, scale)


def scale_advantages(adv: torch.Tensor, rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """``adv`` over the (Bessel-corrected, as TRL's) reward std of each state's group or of the batch."""
    if scale == "group":
        return adv / (rewards.std(dim=1, keepdim=True) + STD_EPS)
    if scale == "batch":
        return adv / (rewards.std() + STD_EPS)
    return adv


def clipped_surrogate(
    logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss (mean over samples) and TRL's diagnostics; all inputs ``[N, k]``."""
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.max(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "policy/clipfrac": (clipped > unclipped).float().mean(),
            "policy/approxkl": 0.5 * ((logp - logp_old) ** 2).mean(),
            "policy/ratio": ratio.mean(),
        }
    return loss, stats


def kl_penalized_rewards(rewards: torch.Tensor, logp_old: torch.Tensor, ref_logp: torch.Tensor,
                         kl_coef: torch.Tensor | float, estimator: str) -> torch.Tensor:
    """The rewards the advantages are built from ``[N, k]``: with ``k1``, TRL PPO's ``reward - kl_coef * (log pi_old(a)
    - log pi_ref(a))`` (a constant of the rollout); the other estimators leave the reward alone (their term is
    in the loss)."""
    return rewards - kl_coef * kl_k1(logp_old, ref_logp) if estimator == "k1" else rewards


def kl_loss_term(logp: torch.Tensor, logp_old: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The ``k3`` option's loss term: ``mean((pi / pi_old)(a) * k3(a))`` over the samples ``[N, k]``, with its gradient
    through ``log pi(a)`` in both factors: an unbiased estimate of ``KL(pi || pi_ref)`` for every ``pi`` (see the
    module docstring), so its gradient is the KL's."""
    return (torch.exp(logp - logp_old) * kl_k3(logp, ref_logp)).mean()
