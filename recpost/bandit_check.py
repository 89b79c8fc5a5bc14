"""Check exp-weighted SFT against the theory in the simulator's bandit world.

A tabular policy (one logit per context and action) is fitted on logged ``(context, action, reward)``
triples with exactly the loss ExpSFT trains with (``exp_weighted_cross_entropy``), full batch. The
population optimum is ``pi*_lambda ∝ pi_beta * exp(r* / lambda)`` (Proposition 4.1), so
``KL(pi*_lambda || pi_theta)`` should fall during training and end far below the KL of the
behaviour-cloning policy (``lambda = inf``, plain SFT) to the same target. With homoscedastic
Gaussian noise the target does not move: ``E[exp((r* + eps) / lambda)] = c * exp(r* / lambda)``.

    python -m recpost.bandit_check            # prints one `name: value` line per figure
"""

from __future__ import annotations

import math

import torch

from recpost.data.simulator import BanditWorld
from recpost.methods.losses import exp_weighted_cross_entropy


def fit_tabular_policy(
    world: BanditWorld,
    context: torch.Tensor,
    action: torch.Tensor,
    reward: torch.Tensor,
    lam: float,
    steps: int = 400,
    lr: float = 0.1,
    track_lam: float | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Fit ``log pi_theta [C, A]`` by Adam on the ExpSFT loss (``lam = inf``: plain SFT).

    Returns the fitted log-probabilities and ``KL(pi*_track || pi_theta)`` every 20 steps
    (``track_lam`` defaults to ``lam``).
    """
    logits = torch.zeros(world.n_contexts, world.n_actions, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    curve = []
    track = track_lam if track_lam is not None else lam
    for step in range(steps):
        loss, _, _ = exp_weighted_cross_entropy(logits[context], action, reward, lam)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            curve.append(world.kl_to_target(torch.log_softmax(logits.detach(), -1), track))
    return torch.log_softmax(logits.detach(), -1), curve


def run(lams: tuple[float, ...] = (0.5, 1.0), noise_std: float = 0.5, n_per_context: int = 2000, seed: int = 0,
        steps: int = 400) -> dict[str, float]:
    """Figures for the closing note: KL at start/end per lambda, BC's KL, values, noise check."""
    figures: dict[str, float] = {}
    for noise in (0.0, noise_std):
        # Gaussian noise without rounding to stars (observations are still clipped to [1, 5]).
        world = BanditWorld(n_contexts=16, n_actions=20, history_len=2, seed=seed, noise_std=noise,
                            behavior_temperature=0.5, slate_size=0, round_to_stars=False)
        gen = torch.Generator().manual_seed(seed + 1)
        logs = world.sample_logs(n_per_context, gen)
        tag = f"noise{noise:g}"
        figures[f"{tag}/value_pi_beta"] = world.value(world.pi_beta)
        for lam in lams:
            bc, _ = fit_tabular_policy(world, *logs, lam=math.inf, steps=steps, track_lam=lam)
            policy, curve = fit_tabular_policy(world, *logs, lam=lam, steps=steps)
            figures[f"{tag}/lam{lam:g}/kl_start"] = curve[0]
            figures[f"{tag}/lam{lam:g}/kl_end"] = curve[-1]
            figures[f"{tag}/lam{lam:g}/kl_bc_to_target"] = world.kl_to_target(bc, lam)
            figures[f"{tag}/lam{lam:g}/value_target"] = world.value(world.target(lam))
            figures[f"{tag}/lam{lam:g}/value_policy"] = world.value(policy.exp())
    return figures


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: extra OpenMP threads only spin-wait on a loaded machine
    for name, value in run().items():
        print(f"{name}: {value:.4f}")
