"""Figures of an experiment's results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import math
import warnings
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def metric_vs_lambda(rows: list[dict], metric: str, path: Path, method: str = "exp_sft") -> Path | None:
    """Test ``metric`` of ``method`` against lambda (log axis, mean ± std over seeds), with the SFT
    and base levels as horizontal lines. Returns the path, or None when there is nothing to plot."""
    ok = [r for r in rows if r.get("status") == "ok" and metric in r]
    lams = sorted({r["setting"]["lam"] for r in ok if r["method"] == method and "lam" in r["setting"]})
    if not lams:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    stats = [_mean_std([r[metric] for r in ok if r["method"] == method and r["setting"].get("lam") == lam]) for lam in lams]
    ax.errorbar(lams, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=method)
    for other, style in (("sft", "--"), ("base", ":")):
        mean, _ = _mean_std([r[metric] for r in ok if r["method"] == other])
        if not math.isnan(mean):
            ax.axhline(mean, linestyle=style, color="grey" if other == "base" else "black", label=other)
    chosen = [r["setting"]["lam"] for r in ok if r["method"] == method and r.get("chosen")]
    if chosen:
        ax.axvline(chosen[0], color="tab:green", alpha=0.3, linewidth=6, label="chosen on val")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("lambda")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _read_curve(path: str) -> dict[str, list[tuple[int, float]]]:
    """``val/*`` columns of a Lightning metrics.csv as (step, value) lists, in step order."""
    import csv

    out: dict[str, list[tuple[int, float]]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if key.startswith("val/") and value not in ("", None):
                    out.setdefault(key, []).append((int(row["step"]), float(value)))
    return out


def training_curves(rows: list[dict], method: str, path: Path, reward: str = "val/rm_reward@10",
                    held_out: str | None = None) -> Path | None:
    """``reward`` (the training reward model's score of the top-10) and a held-out metric over training
    batches (Lightning's logged step; one PPO rollout per batch), one colour per setting (seed 0 solid; other seeds faint). The held-out metric is
    ``val/true_reward@10`` where the data has ground truth, else ``val/ndcg@10``. Reward hacking shows
    as the left panel rising while the right one falls."""
    runs = [r for r in rows if r.get("method") == method and r.get("metrics_csv") and Path(r["metrics_csv"]).is_file()]
    curves = [(r, _read_curve(r["metrics_csv"])) for r in runs]
    curves = [(r, c) for r, c in curves if reward in c]
    if not curves:
        return None
    if held_out is None:
        held_out = "val/true_reward@10" if any("val/true_reward@10" in c for _, c in curves) else "val/ndcg@10"
    settings = sorted({json.dumps(r["setting"], sort_keys=True) for r, _ in curves})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for r, c in curves:
        s = json.dumps(r["setting"], sort_keys=True)
        colour = colours[settings.index(s) % len(colours)]
        label = ", ".join(f"{k}={v}" for k, v in r["setting"].items()) or method
        first = r.get("seed", 0) == min(x.get("seed", 0) for x, _ in curves)
        for ax, metric in zip(axes, (reward, held_out)):
            if metric in c:
                steps, values = zip(*c[metric])
                ax.plot(steps, values, marker=".", color=colour, alpha=1.0 if first else 0.3,
                        label=label if first and ax is axes[0] else None)
    base, _ = _mean_std([r[held_out] for r in rows if r.get("method") == "base" and held_out in r])
    if not math.isnan(base):  # where every run starts from (the pretrained model's validation value)
        axes[1].axhline(base, linestyle=":", color="grey", label="base (pretrained)")
        axes[1].legend(fontsize=8)
    for ax, metric in zip(axes, (reward, held_out)):
        ax.set_xlabel("training batches (PPO: rollouts)")
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{method}: training reward model vs held-out metric")
    return _save(fig, path)


def weight_distribution(config_args: list[str], lams: list[float], path: Path) -> Path | None:
    """Histogram of the normalised ExpSFT weights ``exp(r / lam)`` (batch-mean normalisation over all
    training targets) for each lambda, on the data of ``config_args`` (a ``recpost fit`` config), with the
    effective sample size share in the legend. Uses the same functions as training."""
    import numpy as np
    import torch

    from recpost.cli import RecpostCLI
    from recpost.data import RecDataModule
    from recpost.methods import RecModule
    from recpost.methods.losses import effective_sample_size, exp_reward_weights

    with warnings.catch_warnings():  # "args given while sys.argv also has arguments": intended here
        warnings.simplefilter("ignore")
        cli = RecpostCLI(RecModule, RecDataModule, subclass_mode_model=True, run=False, auto_configure_optimizers=False,
                         args=[*config_args, "--trainer.logger=false"], save_config_callback=None)
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    rewards = torch.cat([b["rewards"][b["target_items"] > 0].float() for b in dm.train_dataloader()])  # [N]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.logspace(-4, 2, 61)
    for lam in lams:
        w = exp_reward_weights(rewards, lam)
        ess = float(effective_sample_size(w))
        ax.hist(w.clamp(bins[0], bins[-1]).numpy(), bins=bins, histtype="step", linewidth=1.5,
                label=f"lam={lam:g} (ESS {ess:.0%})")
    ax.set_xscale("log")
    ax.set_xlabel("weight exp(r / lam) / mean")
    ax.set_ylabel("training targets")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_all(rows: list[dict], folder: Path) -> list[Path]:
    """Every figure the result rows allow: metric vs lambda, and PPO / DPO training curves."""
    written = []
    for metric in ("test/ndcg@10", "test/ndcg@10_liked", "test/true_reward@10", "test/eval_rm_reward@10"):
        name = metric.split("/")[1].replace("@", "_at_")
        written.append(metric_vs_lambda(rows, metric, folder / f"{name}_vs_lambda.png"))
    for method in sorted({r["method"] for r in rows}):
        written.append(training_curves(rows, method, folder / f"{method}_training_curves.png"))
    return [p for p in written if p is not None]
