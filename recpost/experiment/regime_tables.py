"""A regime map's regimes.md as a pure function of its regimes.json (``recpost experiment`` with a regime map
writes both; ``recpost report DIR`` renders it again): per metric and selection a table of the worlds, each
method's mean Δ to the reference over seeds, then what choosing offline costs. The cells are
:mod:`.render`'s, as in results.md."""

from __future__ import annotations

import statistics

from recpost.experiment.render import ORACLE_METRICS, ORACLE_MONITOR, setting_text


def render_regimes(summary: dict) -> str:
    """The text of a regime map's regimes.md from its regimes.json (``summary``): per metric and selection a
    table of the worlds (a method's mean Δ to the reference over seeds), then the cost of choosing offline."""
    monitor, reference, records = summary["monitor"], summary["reference"], summary["rows"]
    oracle_monitor = summary.get("oracle_monitor", ORACLE_MONITOR)
    methods = list(dict.fromkeys(r["method"] for r in records))
    worlds = summary["worlds"]
    done = {r["world"] for r in records}
    lines = [f"# Regime map {summary['name']}: test true reward over {reference}", "",
             f"{len(done)} of {len(worlds)} worlds have results ({summary['config']}). Each cell: the method's mean "
             f"over seeds of (its value - {reference}'s in the same world and seed), at the setting chosen as the "
             f"table says (shown when the method has several); the {reference} column is its own value. `-` in a "
             "setting column: the study's value. Intervals: each world's results.md (paired bootstrap over users)."]
    keys = list(dict.fromkeys([*summary["axes"], *(k for w in worlds for k in w["settings"])]))
    several = set(summary.get("several_settings", []))
    digits = summary.get("digits", 4)  # a snapshot of an older table keeps that table's precision
    for metric in ORACLE_METRICS:
        for selection, chosen_on in (("offline", monitor), ("oracle", f"{oracle_monitor} (oracle, not available offline)")):
            cells = {(r["world"], r["method"]): r for r in records if r["selection"] == selection}
            if not any(r[part].get(metric) is not None for r in cells.values() for part in ("value", "delta")):
                continue  # neither selection nor metric in the records (a snapshot of an older, smaller table)
            lines += ["", f"## Δ {metric} vs {reference}, setting chosen on {chosen_on}", "",
                      f"| world | {' | '.join([*keys, *methods])} |", "|" + "---|" * (1 + len(keys) + len(methods))]
            for world in worlds:
                row = [str(world["settings"].get(k, "-")) for k in keys]
                row += [_regime_cell(cells.get((world["name"], m)), metric, m == reference, m in several, digits)
                        for m in methods]
                lines.append(f"| {world['name']} | {' | '.join(row)} |")
    costs = {method: [selection_cost(records, method, metric) for metric in ORACLE_METRICS] for method in methods}
    if any(c is not None for cs in costs.values() for c in cs):
        lines += ["", f"## What choosing on {monitor} costs: mean over worlds of (oracle Δ - offline Δ)", "",
                  f"| method | {' | '.join(ORACLE_METRICS)} |", "|" + "---|" * (1 + len(ORACLE_METRICS))]
        for method, cs in costs.items():
            lines.append(f"| {method} | {' | '.join('-' if c is None else f'{c:+.{digits}f}' for c in cs)} |")
    if summary.get("heatmap") is None:
        lines += ["", "No heatmaps: the grid has fewer than two axes with several values."]
    return "\n".join(lines) + "\n"


def selection_cost(records: list[dict], method: str, metric: str) -> float | None:
    """Mean over worlds of (oracle - offline) difference to the reference: what the offline choice costs."""
    by_world = {(r["world"], r["selection"]): r["delta"].get(metric) for r in records if r["method"] == method}
    gaps = [by_world[(w, "oracle")] - d for (w, s), d in by_world.items()
            if s == "offline" and d is not None and by_world.get((w, "oracle")) is not None]
    return statistics.mean(gaps) if gaps else None


def _regime_cell(record: dict | None, metric: str, reference: bool, show_setting: bool, digits: int = 4) -> str:
    """A regime table cell: the reference's value, or a method's difference (and its chosen setting)."""
    if record is None or record["delta" if not reference else "value"].get(metric) is None:
        return "-"
    if reference:
        return f"{record['value'][metric]:.{digits}f}"
    return f"{record['delta'][metric]:+.{digits}f}" + (f" ({setting_text(record['setting'])})"
                                                 if show_setting and record["setting"] else "")
