"""Exp-weighted SFT converges to pi_beta * exp(r*/lambda) in the bandit world (Proposition 4.1)."""

from __future__ import annotations

import math

import pytest
import torch

from recpost.diagnostics.bandit_check import fit_tabular_policy
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


def test_bounds_grid_rows_hold_the_theory_and_say_where_it_is_vacuous(tmp_path):
    from recpost.diagnostics.bandit_check import catalog_size_effect, grid_table, plot_grid, theory_grid
    from recpost.evaluation.bounds import eps

    rows = theory_grid(sigmas=(0.0, 1.0), n_actions=(8,), lams=(0.5, 2.0), n_contexts=4, n_per_context=200,
                       draws=3, steps=30)
    assert len(rows) == 4
    for r in rows:
        assert r["ideal"] > 0  # Proposition 4.1: tilting by the true reward improves on pi_beta
        assert r["worst"] < 0 < r["best"] and r["ideal"] <= r["best"] + 1e-9
        assert r["eps"] == pytest.approx(eps(r["sigma"], 8, 0.05))
        assert r["bound_4_3"] == pytest.approx(-2 * r["eps"])
        assert r["bound_4_4"] == pytest.approx(-4.0 * math.expm1(2 * r["eps"] / r["lam"]))
        assert r["vacuous_4_3"] == float(r["bound_4_3"] <= r["worst"])
    noiseless = [r for r in rows if r["sigma"] == 0]
    assert all(r["bound_4_3"] == 0 and r["noisy_tilted_mean"] == pytest.approx(r["ideal"]) for r in noiseless)
    assert all(r["vacuous_4_3"] for r in rows if r["sigma"] == 1.0)  # eps = 3.2 > the reward range / 2
    assert grid_table(rows).count("\n") == 1 + len(rows)
    assert plot_grid(rows, tmp_path / "bounds.png").stat().st_size > 0
    sizes = catalog_size_effect(sizes=(8, 80), n_contexts=4, draws=3)
    assert sizes[1]["eps"] > sizes[0]["eps"] and all(s["loss_worst"] >= s["loss_mean"] for s in sizes)
