"""Figures of an experiment's results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
