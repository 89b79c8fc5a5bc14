"""Honest KL: every KL option of PPO pushes the policy along the gradient of KL(pi || pi_ref), in expectation.

A catalog of 6 items (and the padding column), a softmax policy with free logits, a fixed reference. For each
``kl_estimator`` the KL term is used exactly as ``ppo.py`` uses it (the same pure functions: the reward
``kl_penalized_rewards`` gives the advantages, ``group_advantages`` with k = 2 i.i.d. samples, ``clipped_surrogate``,
and the loss terms), and its expected gradient is summed exactly over every pair of sampled items, weighted by
its probability: no Monte Carlo, so the comparison with autograd's gradient of the enumerated KL is exact up to
float32 rounding (``masked_log_probs`` works in fp32).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from recpost.methods.policy import exact_kl, kl_k3, masked_log_probs
from recpost.methods.policy_gradient import clipped_surrogate, group_advantages, kl_loss_term, kl_penalized_rewards

N_ITEMS, KL_COEF, CLIP = 6, 0.7, 0.2


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(1, N_ITEMS + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


THETA, THETA_OLD, REF = _logits(0), _logits(1), masked_log_probs(_logits(2)).detach()


def _kl_gradient(theta: torch.Tensor) -> torch.Tensor:
    """The exact gradient of ``KL_COEF * KL(pi_theta || pi_ref)`` by autograd over the enumerated catalog."""
    theta = theta.clone().requires_grad_()
    (KL_COEF * exact_kl(masked_log_probs(theta), REF).sum()).backward()
    return theta.grad


def _expected_gradient(estimator: str, theta: torch.Tensor, theta_old: torch.Tensor | None = None) -> torch.Tensor:
    """The KL part of PPO's loss gradient, in expectation over two i.i.d. samples from ``pi_old`` (the rollout's
    policy; ``theta_old=None``: the rollout itself, the first update), summed over all pairs of items."""
    theta = theta.clone().requires_grad_()
    logp = masked_log_probs(theta)  # [1, V + 1]
    logp_old = masked_log_probs(theta if theta_old is None else theta_old).detach()
    total = torch.zeros_like(theta)
    for pair in itertools.product(range(1, N_ITEMS + 1), repeat=2):
        actions = torch.tensor([pair])  # [1, k = 2]
        logp_a, old_a, ref_a = logp.gather(1, actions), logp_old.gather(1, actions), REF.gather(1, actions)
        returns = kl_penalized_rewards(torch.zeros_like(old_a), old_a, ref_a, KL_COEF, estimator)  # the RM's reward: 0
        loss, _ = clipped_surrogate(logp_a, old_a, group_advantages(returns), CLIP)
        if estimator == "k3":
            loss = loss + KL_COEF * kl_loss_term(logp_a, old_a, ref_a)
        if estimator == "exact":
            loss = loss + KL_COEF * exact_kl(logp, REF).mean()
        (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
        total += old_a.exp().prod() * grad
    return total


@pytest.mark.parametrize("estimator", ["exact", "k1", "k3"])
def test_every_kl_estimator_has_the_exact_expected_gradient_at_the_rollout(estimator):
    expected = _expected_gradient(estimator, THETA)
    assert _kl_gradient(THETA).norm() > 0.1  # a real KL to move along, not a vacuous zero
    torch.testing.assert_close(expected, _kl_gradient(THETA), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["exact", "k3"])
def test_the_kl_loss_terms_stay_exact_after_the_policy_moved_from_the_rollout(estimator):
    # Later updates of a rollout (ppo_epochs > 1) sample from pi_old != pi: the ratio-weighted k3 is still an
    # unbiased estimate of KL(pi || pi_ref) as a function of pi, so its gradient stays exact (k1 in the reward is
    # fixed at the rollout: PPO's usual approximation, exact only at the first update).
    torch.testing.assert_close(_expected_gradient(estimator, THETA, THETA_OLD), _kl_gradient(THETA), rtol=1e-5,
                               atol=1e-7)


def _expected(per_sample_loss) -> torch.Tensor:
    """``E_{a ~ pi}[grad per_sample_loss(logp, a)]`` at ``THETA``, summed over the catalog."""
    theta = THETA.clone().requires_grad_()
    logp = masked_log_probs(theta)
    total = torch.zeros_like(theta)
    for a in range(1, N_ITEMS + 1):
        (grad,) = torch.autograd.grad(per_sample_loss(logp, a), theta, retain_graph=True)
        total += logp[0, a].detach().exp() * grad
    return total


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_k3_in_the_reward_would_follow_the_forward_minus_the_reverse_kl():
    # Why k3 is never subtracted from the reward: the policy-gradient term k3(a) * grad log pi(a) has expectation
    # grad KL(pi || ref) - grad KL(ref || pi), not grad KL(pi || ref).
    in_reward = _expected(lambda logp, a: KL_COEF * kl_k3(logp[0, a], REF[0, a]).detach() * logp[0, a])
    theta = THETA.clone().requires_grad_()
    logp = masked_log_probs(theta)
    reverse = (REF.exp() * (REF - logp)).nan_to_num(0.0).sum()  # KL(ref || pi): padding 0 * (-inf + inf) -> 0
    (KL_COEF * (exact_kl(logp, REF).sum() - reverse)).backward()
    torch.testing.assert_close(in_reward, theta.grad, rtol=1e-5, atol=1e-7)
    assert _cosine(in_reward, _kl_gradient(THETA)) < 0.9


def test_k3_in_the_loss_without_the_importance_ratio_would_follow_the_reverse_kl():
    # TRL GRPO's default KL term (no use_bias_correction_kl): E[grad k3(a)] = grad KL(ref || pi).
    plain = _expected(lambda logp, a: KL_COEF * kl_k3(logp[0, a], REF[0, a]))
    theta = THETA.clone().requires_grad_()
    (KL_COEF * (REF.exp() * (REF - masked_log_probs(theta))).nan_to_num(0.0).sum()).backward()
    torch.testing.assert_close(plain, theta.grad, rtol=1e-5, atol=1e-7)
    assert _cosine(plain, _kl_gradient(THETA)) < 0.9
