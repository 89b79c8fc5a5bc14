"""A regime map's results: per world and method, the test true reward gained over SFT.

Each method is taken at the setting chosen on the study's validation metric (``chosen``) and, as an oracle
ablation no real dataset allows, at the one chosen on the validation true reward (``oracle_chosen``; both
marked by :mod:`.report` in each world's ``results.json``). Written as ``regimes.json`` (one record per
world, method and selection), ``regimes.md`` (a table per metric and selection, worlds as rows, methods
as columns) and ``figures/<method>_delta_<metric>.png`` (a heatmap over two grid axes, one panel per value
of the others). Everything is read from the worlds' results files, so it is written again after each world
(the worlds done so far) and costs nothing to rerun.
"""

from __future__ import annotations

import json
import math
import statistics
from itertools import product
from pathlib import Path

from recpost.experiment import figures
from recpost.experiment.regimes import REFERENCE, RegimeMap, World
from recpost.experiment.regime_tables import render_regimes, selection_cost  # noqa: F401
from recpost.experiment.render import ORACLE_METRICS, ORACLE_MONITOR, RM_METHODS  # noqa: F401

# The flag in results.json of each selection, and how the tables name it.
SELECTIONS = {"offline": "chosen", "oracle": "oracle_chosen"}


def world_cells(rows: list[dict], flag: str, reference: str = REFERENCE) -> dict[str, dict]:
    """Per policy method of one world (its ``results.json`` rows), at the setting marked ``flag``: the
    setting, its finished seeds, each metric's mean over them (``value``) and the mean over seeds of its
    difference to the reference's run of the same seed (``delta``; the reference at its own ``flag`` setting)."""
    picked = [r for r in rows if r["method"] not in RM_METHODS and r.get(flag)]
    ref = {r["seed"]: r for r in picked if r["method"] == reference and r["status"] == "ok"}
    cells = {}
    for method in dict.fromkeys(r["method"] for r in picked):
        runs = [r for r in picked if r["method"] == method]
        ok = [r for r in runs if r["status"] == "ok"]
        value, delta = {}, {}
        for metric in ORACLE_METRICS:
            values = [r[metric] for r in ok if metric in r]
            diffs = [r[metric] - ref[r["seed"]][metric] for r in ok if metric in r and metric in ref.get(r["seed"], {})]
            value[metric] = statistics.mean(values) if values else None
            delta[metric] = statistics.mean(diffs) if diffs else None
        cells[method] = {"setting": runs[0]["setting"], "seeds": len(ok), "value": value, "delta": delta}
    return cells


def regime_records(worlds: list[tuple[World, list[dict]]]) -> list[dict]:
    """One record per world (with its ``results.json`` rows), method and selection (``offline``, ``oracle``)."""
    return [{"world": world.name, "world_settings": world.settings, "on_grid": world.on_grid, "method": method,
             "selection": selection, **cell}
            for world, rows in worlds for selection, flag in SELECTIONS.items()
            for method, cell in world_cells(rows, flag).items()]


def write_regime_results(regimes: RegimeMap, out: Path) -> Path:
    """regimes.json, regimes.md and the heatmaps from the results of the worlds run so far (their results.json).
    regimes.md is rendered from the regimes.json just written (:func:`.regime_tables.render_regimes`), so
    ``recpost report`` on the folder gives the same bytes."""
    worlds = [(w, json.loads(p.read_text())) for w in regimes.worlds if (p := out / w.name / "results.json").is_file()]
    records = regime_records(worlds)
    methods = list(dict.fromkeys(r["method"] for r in records))
    text = json.dumps({
        "name": regimes.name, "config": str(regimes.path), "reference": REFERENCE, "monitor": regimes.study.monitor,
        "oracle_monitor": ORACLE_MONITOR, "axes": regimes.axes, "heatmap": regimes.heatmap,
        "several_settings": [m.name for m in regimes.study.methods if len(m.settings()) > 1],
        "worlds": [{"name": w.name, "settings": w.settings, "on_grid": w.on_grid,
                    "has_results": any(w is done for done, _ in worlds)} for w in regimes.worlds],
        "rows": records}, indent=2)
    (out / "regimes.json").write_text(text)
    (out / "regimes.md").write_text(render_regimes(json.loads(text)))
    if regimes.heatmap:
        for method in methods:
            if method != REFERENCE:
                for metric in ORACLE_METRICS:
                    regime_heatmap(regimes, records, method, metric, out / "figures")
    return out / "regimes.md"


def regime_heatmap(regimes: RegimeMap, records: list[dict], method: str, metric: str, folder: Path) -> Path | None:
    """``method``'s offline-choice difference to the reference over the heatmap axes, one panel per value of
    the other grid axes (grid worlds only)."""
    x, y = regimes.heatmap
    others = [k for k in regimes.axes if k not in (x, y)]
    delta = {r["world"]: r["delta"][metric] for r in records if r["method"] == method and r["selection"] == "offline"}
    panels = {}
    for rest in product(*(regimes.axes[k] for k in others)):
        title = ", ".join(f"{k}={v}" for k, v in zip(others, rest))
        panels[title] = {}
        for world in regimes.worlds:
            if world.on_grid and all(world.settings[k] == v for k, v in zip(others, rest)):
                value = delta.get(world.name)
                panels[title][(world.settings[x], world.settings[y])] = math.nan if value is None else value
    name = metric.partition("/")[2].replace("@", "_at_")
    return figures.heatmaps(panels, (x, y), (regimes.axes[x], regimes.axes[y]),
                            f"{method}: Δ {metric} vs {REFERENCE} (setting chosen on {regimes.study.monitor})",
                            f"Δ {figures.metric_label(metric)}", folder / f"{method}_delta_{name}.png")
