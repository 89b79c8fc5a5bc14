"""Exp-weighted SFT converges to pi_beta * exp(r*/lambda) in the bandit world (Proposition 4.1)."""

from __future__ import annotations

import math

import pytest
import torch

from recpost.bandit_check import fit_tabular_policy
from recpost.data.simulator import BanditWorld


def _logs(noise: float, n: int = 1500, seed: int = 0):
    # World knobs pinned here so that changes of the simulator's defaults do not move this check.
    world = BanditWorld(n_contexts=8, n_actions=12, history_len=2, seed=seed, noise_std=noise,
                        behavior_temperature=0.5, slate_size=0, round_to_stars=False)
    return world, world.sample_logs(n, torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_exp_sft_policy_approaches_the_analytic_target(lam):
    world, logs = _logs(noise=0.0)
    _, curve = fit_tabular_policy(world, *logs, lam=lam, steps=300)
    bc, _ = fit_tabular_policy(world, *logs, lam=math.inf, steps=300)
    kl_bc = world.kl_to_target(bc, lam)
    assert curve[-1] < curve[0]  # decreases over training
    assert curve[-1] < 0.2 * kl_bc  # and ends well below behaviour cloning's distance to the target


def test_homoscedastic_noise_does_not_move_the_target():
    lam = 1.0
    world, logs = _logs(noise=0.5, n=3000)
    policy, curve = fit_tabular_policy(world, *logs, lam=lam, steps=300)
    bc, _ = fit_tabular_policy(world, *logs, lam=math.inf, steps=300)
    assert curve[-1] < 0.3 * world.kl_to_target(bc, lam)
    assert world.value(policy.exp()) > world.value(world.pi_beta)
