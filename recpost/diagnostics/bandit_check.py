"""Check exp-weighted SFT against the theory in the simulator's bandit world.

A tabular policy (one logit per context and action) is fitted on logged ``(context, action, reward)``
triples with exactly the loss ExpSFT trains with (``exp_weighted_cross_entropy``), full batch. The
population optimum is ``pi*_lambda ∝ pi_beta * exp(r* / lambda)`` (Proposition 4.1), so
``KL(pi*_lambda || pi_theta)`` should fall during training and end far below the KL of the
behaviour-cloning policy (``lambda = inf``, plain SFT) to the same target. With homoscedastic
Gaussian noise the target does not move: ``E[exp((r* + eps) / lambda)] = c * exp(r* / lambda)``.

``--grid`` holds the guarantees of Theorems 4.3 and 4.4 (``recpost.evaluation.bounds``) against
measured improvements ``V(pi) - V(pi_beta)`` over a grid of noise ``sigma``, catalog size ``|A|`` and
``lambda``: the trained ExpSFT policy, the ideal tilted policy ``pi*_lambda`` (true rewards), and the
policy the theorems are about, ``pi_beta exp(r_hat / lambda)`` tilted by a noisy estimate ``r_hat = r*
+ sigma N(0, 1)`` drawn once per action (mean and worst over draws). It prints a markdown table and
writes a figure.

    python -m recpost.diagnostics.bandit_check            # prints one `name: value` line per figure
    python -m recpost.diagnostics.bandit_check --grid --figure docs/figures/bandit_bounds.png   # ~4 min on one core
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from recpost.core.files import atomic_path
from recpost.data.simulator import BanditWorld
from recpost.evaluation.bounds import additive_lower_bound, eps, tilted_lower_bound, vacuous
from recpost.methods.losses import exp_weighted_cross_entropy

R_MIN, R_MAX = 1.0, 5.0  # the simulator's reward scale; the theorems' R_max is its width


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


def theory_grid(
    sigmas: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0),
    n_actions: tuple[int, ...] = (20, 200),
    lams: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0),
    n_contexts: int = 16,
    n_per_context: int = 2000,
    delta: float = 0.05,
    draws: int = 20,
    steps: int = 400,
    seed: int = 0,
) -> list[dict[str, float]]:
    """One row per ``(sigma, |A|, lambda)``: measured improvements over ``pi_beta`` and the two bounds.

    Every world has the same contexts and the same number of logs per context, so a larger catalog
    also means fewer logs per action: the measured ``|A|`` effect is both ``log |A|`` in ``eps`` and
    that sparsity. Ratings are ``r* + sigma N(0, 1)`` clipped to [1, 5] (not rounded).
    """
    rows = []
    for sigma in sigmas:
        for n_act in n_actions:
            world = BanditWorld(n_contexts=n_contexts, n_actions=n_act, history_len=2, seed=seed, noise_std=sigma,
                                behavior_temperature=0.5, slate_size=0, round_to_stars=False)
            logs = world.sample_logs(n_per_context, torch.Generator().manual_seed(seed + 1))
            v_beta = world.value(world.pi_beta)
            r = world.true_reward.double()
            worst = float(r.masked_fill(world.pi_beta == 0, math.inf).min(-1).values.mean()) - v_beta
            best = float(r.masked_fill(world.pi_beta == 0, -math.inf).max(-1).values.mean()) - v_beta
            e = eps(sigma, n_act, delta)
            gen = torch.Generator().manual_seed(seed + 2)
            r_hat = [r + sigma * torch.randn(r.shape, generator=gen, dtype=torch.float64) for _ in range(draws)]
            for lam in lams:
                policy, curve = fit_tabular_policy(world, *logs, lam=lam, steps=steps)
                noisy = [world.value(torch.softmax(world.log_pi_beta.double() + rh / lam, -1)) - v_beta for rh in r_hat]
                bound_43 = additive_lower_bound(v_beta, e) - v_beta
                bound_44 = tilted_lower_bound(v_beta, e, lam, R_MAX - R_MIN) - v_beta
                rows.append({
                    "sigma": sigma, "n_actions": n_act, "lam": lam, "eps": e, "value_pi_beta": v_beta,
                    "trained": world.value(policy.exp()) - v_beta, "ideal": world.value(world.target(lam)) - v_beta,
                    "noisy_tilted_mean": sum(noisy) / len(noisy), "noisy_tilted_worst": min(noisy),
                    "bound_4_3": bound_43, "bound_4_4": bound_44, "worst": worst, "best": best,
                    "vacuous_4_3": float(vacuous(bound_43, worst)), "vacuous_4_4": float(vacuous(bound_44, worst)),
                    "kl_end": curve[-1],
                })
    return rows


def grid_table(rows: list[dict[str, float]]) -> str:
    """The grid as a markdown table (improvements over ``pi_beta``; ``vacuous`` = below the worst action)."""
    lines = [
        "| sigma | \\|A\\| | lambda | eps | trained | ideal pi*_lambda | tilted by r_hat: mean / worst | Thm 4.3 "
        "bound | Thm 4.4 bound | worst action |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def bound(value: float, is_vacuous: float) -> str:
        text = "-inf" if value == -math.inf else f"{value:+.3f}" if value > -1000 else f"{value:.1e}"
        return f"{text} (vacuous)" if is_vacuous else text

    for r in rows:
        lines.append(
            f"| {r['sigma']:g} | {r['n_actions']} | {r['lam']:g} | {r['eps']:.2f} | {r['trained']:+.3f} | "
            f"{r['ideal']:+.3f} | {r['noisy_tilted_mean']:+.3f} / {r['noisy_tilted_worst']:+.3f} | "
            f"{bound(r['bound_4_3'], r['vacuous_4_3'])} | {bound(r['bound_4_4'], r['vacuous_4_4'])} | {r['worst']:+.3f} |"
        )
    return "\n".join(lines)


def catalog_size_effect(
    sizes: tuple[int, ...] = (20, 200, 2000, 20000),
    sigma: float = 1.0,
    lam: float = 0.5,
    n_contexts: int = 16,
    delta: float = 0.05,
    draws: int = 20,
    seed: int = 0,
) -> list[dict[str, float]]:
    """How much the policy tilted by noisy estimates ``r_hat = r* + sigma N(0, 1)`` loses against the
    ideal ``pi*_lambda``, per catalog size, next to ``eps`` (which grows like ``sqrt(log |A|)``). No
    training, so catalogs far beyond a tabular fit are affordable."""
    rows = []
    for n_act in sizes:
        world = BanditWorld(n_contexts=n_contexts, n_actions=n_act, history_len=2, seed=seed, noise_std=sigma,
                            behavior_temperature=0.5, slate_size=0, round_to_stars=False)
        r, ideal = world.true_reward.double(), world.value(world.target(lam))
        gen = torch.Generator().manual_seed(seed + 2)
        losses = [ideal - world.value(torch.softmax(world.log_pi_beta.double() + (r + sigma * torch.randn(
            r.shape, generator=gen, dtype=torch.float64)) / lam, -1)) for _ in range(draws)]
        ess = float((1.0 / world.target(lam).double().pow(2).sum(-1)).mean())  # actions pi*_lambda spreads over
        rows.append({"n_actions": n_act, "eps": eps(sigma, n_act, delta), "loss_mean": sum(losses) / draws,
                     "loss_worst": max(losses), "target_actions": ess,
                     "value_gain_ideal": ideal - world.value(world.pi_beta)})
    return rows


def size_table(rows: list[dict[str, float]], sigma: float = 1.0, lam: float = 0.5) -> str:
    lines = [f"| \\|A\\| (sigma {sigma:g}, lambda {lam:g}) | eps | 2 eps (Thm 4.3's loss) | loss of the tilted-by-r_hat "
             "policy vs pi*_lambda: mean / worst | actions pi*_lambda spreads over (1 / sum p^2) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_actions']} | {r['eps']:.2f} | {2 * r['eps']:.2f} | {r['loss_mean']:.3f} / "
                     f"{r['loss_worst']:.3f} | {r['target_actions']:.1f} |")
    return "\n".join(lines)


def plot_grid(rows: list[dict[str, float]], path: Path) -> Path:
    """Improvement over ``pi_beta`` against lambda, one panel per (|A|, sigma): measured curves and bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = sorted({r["sigma"] for r in rows})
    sizes = sorted({r["n_actions"] for r in rows})
    fig, axes = plt.subplots(len(sizes), len(sigmas), figsize=(4 * len(sigmas), 3.2 * len(sizes)), squeeze=False,
                             sharex=True)
    for i, n_act in enumerate(sizes):
        for j, sigma in enumerate(sigmas):
            ax = axes[i][j]
            cell = sorted((r for r in rows if r["n_actions"] == n_act and r["sigma"] == sigma), key=lambda r: r["lam"])
            lam = [r["lam"] for r in cell]
            worst, best = cell[0]["worst"], cell[0]["best"]
            floor = worst - 0.3 * (best - worst)  # vacuous bounds are drawn at the bottom of the panel
            for key, style, label in (("trained", "o-", "ExpSFT, trained"), ("ideal", "s--", "ideal pi*_lambda"),
                                      ("noisy_tilted_mean", "^:", "tilted by r_hat (mean)"),
                                      ("noisy_tilted_worst", "v:", "tilted by r_hat (worst)"),
                                      ("bound_4_3", "k-", "Thm 4.3 bound"), ("bound_4_4", "r-", "Thm 4.4 bound")):
                ax.plot(lam, [max(r[key], floor) for r in cell], style, label=label, markersize=4)
            ax.axhspan(floor - 1.0, worst, color="0.92", label="below the worst action: vacuous")
            ax.axhline(0.0, color="gray", linewidth=0.5)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lam, [f"{v:g}" for v in lam])
            ax.set_ylim(floor - 0.05, best + 0.1)
            ax.set_title(f"|A| = {n_act}, sigma = {sigma:g}", fontsize=10)
            if i == len(sizes) - 1:
                ax.set_xlabel("lambda")
            if j == 0:
                ax.set_ylabel("V(pi) - V(pi_beta)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the temporary name keeps the .png ending, which savefig reads
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import argparse  # two flags: the standard library's parser is enough

    parser = argparse.ArgumentParser(prog="python -m recpost.diagnostics.bandit_check", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", action="store_true", help="the bounds of Theorems 4.3/4.4 against measured values")
    parser.add_argument("--figure", type=Path, default=Path("bandit_bounds.png"), help="where --grid writes its figure")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: extra OpenMP threads only spin-wait on a loaded machine
    if args.grid:
        grid = theory_grid()
        print(grid_table(grid))
        print(f"figure: {plot_grid(grid, args.figure)}\n")
        print(size_table(catalog_size_effect()))
    else:
        for name, value in run().items():
            print(f"{name}: {value:.4f}")
