"""Figures of an experiment's results (matplotlib, Agg backend: no display needed).

Everything here works from result rows, metric files and arrays the caller passes: no CLI, no config
parsing, so the experiment runner imports this module and never the other way round.
"""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recpost.core.files import atomic_path  # noqa: E402


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created) and free it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the temporary name keeps the .png ending, which savefig reads
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


# Metric names in words, for axis labels ("test/ndcg@10" -> "NDCG@10 (test)").
_METRIC_WORDS = {
    "ndcg@10": "NDCG@10", "ndcg@10_liked": "NDCG@10 on liked targets", "hr@10": "HR@10",
    "true_reward@10": "true reward of the top 10", "rm_reward@10": "training RM's rating of the top 10",
    "eval_rm_reward@10": "evaluator RM's rating of the top 10", "judge_reward@10": "judges' rating of the top 10",
}
_SPLITS = {"val": "validation", "test": "test", "test_all": "test, every target"}
# Units of the metrics that have one (ratings and rewards are on the data's star scale).
_METRIC_UNITS = {"true_reward@10": "stars", "rm_reward@10": "stars", "eval_rm_reward@10": "stars", "rating@10": "stars",
                 "judge_reward@10": "stars"}
JUDGE_CURVE = "val/judge_reward@10"


def metric_label(metric: str) -> str:
    """``split/name`` in words, with its unit: ``test/true_reward@10`` -> ``true reward of the top 10 (stars,
    test)``; ``test/ndcg@10`` -> ``NDCG@10 (test)``."""
    split, _, name = metric.partition("/")
    name = name or split
    words, unit = _METRIC_WORDS.get(name, name), _METRIC_UNITS.get(name)
    where = [part for part in (unit, _SPLITS.get(split, split) if metric.count("/") else None) if part]
    return f"{words} ({', '.join(where)})" if where else words


def curve_x_label(method: str) -> str:
    """What one logged step of ``method`` is, when the caller does not say (one PPO rollout per batch)."""
    return "PPO rollouts (training batches)" if method == "ppo" else "training batches"


def metric_vs_lambda(rows: list[dict], metric: str, path: Path, method: str = "exp_sft") -> Path | None:
    """Test ``metric`` of ``method`` against lambda (log axis; mean with ± std error bars where several
    seeds exist), with the SFT and base levels as horizontal lines (± std bands). Returns the path, or
    None when there is nothing to plot."""
    ok = [r for r in rows if r.get("status") == "ok" and metric in r]
    lams = sorted({r["setting"]["lam"] for r in ok if r["method"] == method and "lam" in r["setting"]})
    if not lams:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    values = [[r[metric] for r in _validation_pick([r for r in ok if r["method"] == method
                                                    and r["setting"].get("lam") == lam])] for lam in lams]
    stats = [_mean_std(v) for v in values]
    seeds = max(len(v) for v in values)
    ax.errorbar(lams, [m for m, _ in stats], yerr=[s for _, s in stats] if seeds > 1 else None, marker="o", capsize=3,
                label=f"{method} (mean ± std, {seeds} seeds)" if seeds > 1 else method)
    for other, style in (("sft", "--"), ("base", ":")):
        level = [r[metric] for r in _validation_pick([r for r in ok if r["method"] == other])]
        mean, std = _mean_std(level)
        if not math.isnan(mean):
            colour = "grey" if other == "base" else "black"
            ax.axhline(mean, linestyle=style, color=colour, label=other)
            if len(level) > 1:
                ax.axhspan(mean - std, mean + std, color=colour, alpha=0.1)
    chosen = [r["setting"]["lam"] for r in ok if r["method"] == method and r.get("chosen")]
    if chosen:
        ax.axvline(chosen[0], color="tab:green", alpha=0.3, linewidth=6, label="chosen on val")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("lambda (reward units, log scale)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{method}: {metric_label(metric)} vs lambda", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _validation_pick(rows: list[dict]) -> list[dict]:
    """The rows of the setting validation prefers among ``rows`` (a study with ``trials`` runs several settings
    per lambda, e.g. learning rates; SFT several learning rates): the best mean ``monitor`` over seeds. Rows of
    one setting are returned as they are."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(json.dumps(r["setting"], sort_keys=True), []).append(r)
    if len(groups) < 2:
        return rows
    monitor, mode = rows[0].get("monitor", "val/ndcg@10"), rows[0].get("monitor_mode", "max")
    scored = {k: statistics.mean(vals) for k, rs in groups.items() if (vals := [r[monitor] for r in rs if monitor in r])}
    if not scored:
        return rows
    return groups[(max if mode == "max" else min)(scored, key=scored.get)]


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
                    held_out: str | None = None, x_label: str | None = None) -> Path | None:
    """``reward`` (the training reward model's score of the top-10) and a held-out metric over training
    batches (Lightning's logged step), one colour per setting: the mean over seeds, with a ± std band
    where several seeds exist. The held-out metric is ``val/true_reward@10`` where the data has ground
    truth, else ``val/ndcg@10``; where the study has judges, a third panel shows their rating of the top 10.
    Reward hacking shows as the left panel rising while the others fall.
    ``x_label``: what one step is (default :func:`curve_x_label`)."""
    runs = [r for r in rows if r.get("method") == method and r.get("metrics_csv") and Path(r["metrics_csv"]).is_file()]
    curves = [(r, _read_curve(r["metrics_csv"])) for r in runs]
    curves = [(r, c) for r, c in curves if reward in c]
    if not curves:
        return None
    if held_out is None:
        held_out = "val/true_reward@10" if any("val/true_reward@10" in c for _, c in curves) else "val/ndcg@10"
    settings = sorted({json.dumps(r["setting"], sort_keys=True) for r, _ in curves})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [reward, held_out, *([JUDGE_CURVE] if any(JUDGE_CURVE in c for _, c in curves) else [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for i, setting in enumerate(settings):
        group = [(r, c) for r, c in curves if json.dumps(r["setting"], sort_keys=True) == setting]
        label = ", ".join(f"{k}={v}" for k, v in group[0][0]["setting"].items()) or method
        if len(group) > 1:
            label += f" ({len(group)} seeds)"
        for ax, metric in zip(axes, panels):
            _plot_mean_curve(ax, [c[metric] for _, c in group if metric in c], colours[i % len(colours)],
                             label if ax is axes[0] else None)
    base = [r[held_out] for r in rows if r.get("method") == "base" and held_out in r]
    mean, _ = _mean_std(base)
    if not math.isnan(mean):  # where every run starts from (the pretrained model's validation value)
        axes[1].axhline(mean, linestyle=":", color="grey", label="base (pretrained)")
        axes[1].legend(fontsize=8)
    for ax, metric in zip(axes, panels):
        ax.set_xlabel(x_label or curve_x_label(method))
        ax.set_ylabel(metric_label(metric))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{method}: training reward model vs held-out metric" + (" and judges" if len(panels) > 2 else ""))
    return _save(fig, path)


def _plot_mean_curve(ax, curves: list[list[tuple[int, float]]], colour: str, label: str | None) -> None:
    """The mean over ``curves`` (one per seed) at each logged step, and a ± std band where several seeds have it."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    if not by_step:
        return
    steps = sorted(by_step)
    stats = [_mean_std(by_step[s]) for s in steps]
    means = [m for m, _ in stats]
    ax.plot(steps, means, marker=".", color=colour, label=label)
    if len(curves) > 1:
        ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], color=colour, alpha=0.2)


def weight_distribution(rewards: np.ndarray, lams: list[float], path: Path) -> Path | None:
    """Histogram of the normalised ExpSFT weights ``exp(r / lam)`` (batch-mean normalisation over all
    training targets) for each lambda, given the reward of every training target ``[N]``, with the
    effective sample size share in the legend. Uses the same functions as training."""
    import torch

    from recpost.methods.losses import effective_sample_size, exp_reward_weights

    rewards = torch.as_tensor(np.asarray(rewards, dtype=np.float32))  # [N]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.logspace(-4, 2, 61)
    for lam in lams:
        w = exp_reward_weights(rewards, lam)
        ess = float(effective_sample_size(w))
        ax.hist(w.clamp(bins[0], bins[-1]).numpy(), bins=bins, histtype="step", linewidth=1.5,
                label=f"lambda={lam:g} (ESS {ess:.0%})")
    ax.set_xscale("log")
    ax.set_xlabel("weight exp(r / lambda) / mean weight (log scale)")
    ax.set_ylabel("training targets")
    ax.set_title(f"ExpSFT weights of the {len(rewards):,} training targets", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def heatmaps(panels: dict[str, dict[tuple, float]], axes: tuple[str, str], ticks: tuple[list, list], title: str,
             value_label: str, path: Path) -> Path | None:
    """One heatmap per panel (``panels``: its title -> ``{(x, y): value}``, NaN or absent for a cell without a
    result) over ``ticks`` of the two ``axes``, each cell written, colours centred on 0 with one scale for the
    whole figure (blue above 0, red below). Returns the path, or None when no cell has a value."""
    values = [v for cells in panels.values() for v in cells.values() if not math.isnan(v)]
    if not values:
        return None
    bound = max(abs(v) for v in values) or 1.0
    (x_name, y_name), (xs, ys) = axes, ticks
    fig, grid = plt.subplots(1, len(panels), figsize=(2.2 + 1.1 * len(xs) * len(panels), 1.6 + 0.8 * len(ys)),
                             squeeze=False, layout="constrained")
    for ax, (panel, cells) in zip(grid[0], panels.items()):
        table = np.array([[cells.get((x, y), math.nan) for x in xs] for y in ys], dtype=float)  # [len(ys), len(xs)]
        image = ax.imshow(np.ma.masked_invalid(table), cmap="RdBu", vmin=-bound, vmax=bound, origin="lower", aspect="auto")
        for (i, j), v in np.ndenumerate(table):
            ax.text(j, i, "-" if math.isnan(v) else f"{v:+.3f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(v) > 0.6 * bound else "black")  # readable on the darkest cells
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys] if ax is grid[0][0] else [])
        ax.set_xlabel(x_name)
        ax.set_title(panel, fontsize=9)
    grid[0][0].set_ylabel(y_name)
    fig.colorbar(image, ax=list(grid[0]), label=value_label, shrink=0.8)
    fig.suptitle(textwrap.fill(title, 48), fontsize=10)  # a small map's figure is narrower than one title line
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)  # not _save: its tight_layout would undo the constrained layout of the colour bar
    plt.close(fig)
    return path


def write_all(rows: list[dict], folder: Path, curve_labels: Mapping[str, str] | None = None) -> list[Path]:
    """Every figure the result rows allow (:func:`write_figures`), as one list of paths."""
    return [p for paths in write_figures(rows, folder, curve_labels).values() for p in paths]


def write_figures(rows: list[dict], folder: Path, curve_labels: Mapping[str, str] | None = None,
                  lambda_method: str = "exp_sft") -> dict[str, list[Path]]:
    """Every figure the result rows allow, per method it shows: ``lambda_method``'s metrics vs lambda, and
    the training curves of each method with a training RM (``curve_labels``: each method's x-axis label,
    see :func:`training_curves`)."""
    curve_labels = curve_labels or {}
    written: dict[str, list[Path | None]] = {lambda_method: []}
    for metric in ("test/ndcg@10", "test/ndcg@10_liked", "test/true_reward@10", "test/eval_rm_reward@10",
                   "test/judge_reward@10", "test_all/ndcg@10"):
        split, _, name = metric.partition("/")
        name = ("all_targets_" if split == "test_all" else "") + name.replace("@", "_at_")
        written[lambda_method].append(metric_vs_lambda(rows, metric, folder / f"{name}_vs_lambda.png", lambda_method))
    for method in sorted({r["method"] for r in rows}):
        written.setdefault(method, []).append(training_curves(rows, method, folder / f"{method}_training_curves.png",
                                                              x_label=curve_labels.get(method)))
    return {method: kept for method, paths in written.items() if (kept := [p for p in paths if p is not None])}
