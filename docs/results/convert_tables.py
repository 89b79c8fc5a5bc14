"""One-off: rebuild results.json snapshots from the study tables of the old README (kept for the record).

The runs behind the old README's results tables were made on earlier machines; their results.json files are
gone, and only the tables (mean ± std over seeds, intervals, the chosen marks) remain. This script turns each
table into a results.json in the renderer's schema (recpost.experiment.render): one row per method and
setting that *summarises* its runs ({"mean", "std"} per metric, ``runs`` / ``runs_ok`` from the table's seeds
column), or, for a one-seed table, the run itself. `recpost report docs/results/<study>` then renders the
table again. Nothing here is part of the package; it was run once:

    git show 838e3ec:README.md > /tmp/README.old.md
    python docs/results/convert_tables.py /tmp/README.old.md

A re-run of a study replaces its snapshot by the run's real results.json (trimmed: ``metrics_csv`` paths
dropped) and its page's provenance line.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
# Study folder -> (the README heading above its tables, how many seeds its runs had, the run's commit).
STUDIES = {
    "sim-previous-run": ("### The default study: simulator, every method (one seed)", 1),
    "sim-3-seeds": ("### Simulator, SFT vs ExpSFT, 3 seeds (the previous default study)", 3),
    "ml100k": ("### MovieLens-100K: every method, 3 seeds", 3),
    "paper-ml100k": ("### The paper's study on ML-100K (paper protocol, `--quick`, 3 seeds)", 3),
    "paper-ml1m": ("### The paper's study on ML-1M (users 1-2,999) (paper protocol, `--quick`, 3 seeds)", 3),
}
NUMBER = r"[+-]?\d+(?:\.\d+)?"
INTERVAL = re.compile(rf"^({NUMBER}) \[({NUMBER}), ({NUMBER})\]( \*)?$")
DELTA = re.compile(r"^Δ (\S+) vs (\S+) \[95% CI\]$")
CORRELATION = re.compile(rf"^Correlation of the (judges'|evaluator's) and the training reward model's errors .*: ({NUMBER})")


def section(readme: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level (outside code blocks)."""
    level = len(heading.split(" ")[0])
    lines, fenced = readme[readme.index(heading + "\n") + len(heading) + 1:].splitlines(), False
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        if not fenced and re.match(rf"^#{{1,{level}}} ", line):
            return "\n".join(lines[:i])
    return "\n".join(lines)


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text`` (outside code blocks), as rows of stripped cells, header first."""
    out, current, fenced = [], [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if not all(set(c) <= set("-|") for c in cells):
                current.append(cells)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def value(cell: str, seeds: int):
    """A metric cell: ``m ± s`` -> a summary, ``v`` -> a number, ``-`` -> None (bold marks dropped)."""
    cell = cell.replace("**", "")
    if cell == "-":
        return None
    if " ± " in cell:
        mean, std = cell.split(" ± ")
        return {"mean": float(mean), "std": float(std)}
    return float(cell) if seeds == 1 else {"mean": float(cell)}


def setting(cell: str) -> tuple[dict, bool]:
    """``lam=0.5 **(chosen on val)**`` or the older ``{"lam": 0.5} (chosen on val)`` -> (setting, chosen)."""
    chosen = "(chosen on val)" in cell
    cell = cell.replace("**(chosen on val)**", "").replace("(chosen on val)", "").strip()
    if cell == "-":
        return {}, chosen
    if cell.startswith("{"):
        return json.loads(cell), chosen
    return {k: json.loads(v) for k, v in (part.split("=") for part in cell.split(", "))}, chosen


def policy_rows(table: list[list[str]], seeds: int) -> list[dict]:
    header, rows = table[0], []
    monitor = next(h for h in header if h.startswith("val/"))
    for cells in table[1:]:
        cell = dict(zip(header, cells))
        method = cell["method"]
        settings, chosen = setting(cell["setting"])
        row = {"method": method, "setting": settings, "seed": 0 if seeds == 1 else None, "status": "ok"}
        if seeds > 1:
            runs = cell.get("seeds")
            row.update({"runs": int(runs.split("/")[1]), "runs_ok": int(runs.split("/")[0])} if runs else {"runs": seeds})
        row["chosen"] = chosen
        intervals, reference = {}, "sft"
        for name, text in cell.items():
            if (delta := DELTA.match(name)) is not None:
                reference = delta.group(2)
                if (m := INTERVAL.match(text)) is not None:
                    intervals[delta.group(1)] = {"mean": float(m.group(1)), "low": float(m.group(2)),
                                                 "high": float(m.group(3)), "seeds": seeds}
            elif name.startswith(("val/", "test/", "test_all/")) and (v := value(text, seeds)) is not None:
                row[name] = v
        row.update(monitor=monitor, monitor_mode="max", reference=reference)
        if any(DELTA.match(name) for name in header):  # a table without Δ columns has no intervals to show
            row["intervals"] = intervals
        rows.append(row)
    # A method with one setting is chosen whatever its mark (the table only marks methods with several).
    for r in rows:
        if sum(o["method"] == r["method"] for o in rows) == 1:
            r["chosen"] = True
    return rows


def rm_rows(table: list[list[str]], seeds: int) -> list[dict]:
    header, rows = table[0], []
    for cells in table[1:]:
        cell = dict(zip(header, cells))
        runs = cell.get("seeds") or cell.get("runs")
        row = {"method": cell["reward model"], "setting": {}, "seed": 0 if seeds == 1 else None, "status": "ok"}
        if seeds > 1 or runs != "1/1":
            row.update(runs=int(runs.split("/")[1]), runs_ok=int(runs.split("/")[0]))
        row["chosen"] = True
        row.update({k: v for k, t in cell.items() if k.startswith("test/") and (v := value(t, seeds)) is not None})
        rows.append(row)
    return rows


def convert(readme: str, heading: str, seeds: int) -> list[dict]:
    text = section(readme, heading)
    rows = []
    for table in tables(text):
        if table[0][0] == "method":
            rows += policy_rows(table, seeds)
        elif table[0][0] == "reward model":
            rows += rm_rows(table, seeds)
    for line in text.splitlines():
        if (m := CORRELATION.match(line)) is not None:
            method = "judge" if m.group(1) == "judges'" else "eval_reward_model"
            next(r for r in rows if r["method"] == method)["rm_error_corr"] = float(m.group(2))
    return rows


# The regime map's README table: its world labels and method names, as the run named them.
REGIME_HEADING = "### The regime map (simulator, `--quick`)"
REGIME_METHODS = {"SFT": "sft", "ExpSFT (lambda)": "exp_sft", "LinearSFT": "linear_sft", "A-SFT": "asft", "PPO": "ppo",
                  "online DPO": "online_dpo", "DPO": "dpo"}
REGIME_AXES = {"noise_std": [0.25, 1.0], "exposure_concentration": [0.0, 1.5], "n_items": [1000]}


def regime_summary(readme: str) -> dict:
    """regimes.json of the quick regime map from its README table: per world, SFT's test true_reward@10 and
    each method's mean Δ to it at the setting chosen on val/ndcg@10 (the only selection and metric the table
    kept, at its 3 decimals); the oracle selection and true_reward_sampled were not tabulated and stay absent."""
    table = tables(section(readme, REGIME_HEADING))[0]
    header, worlds, records = table[0], [], []
    for cells in table[1:]:
        label = cells[0]
        if label.startswith("placebo"):
            name, settings, on_grid = "placebo", {"shuffle_ratings": True}, False
        else:
            noise, exposure = (float(x) for x in re.findall(r"(?:noise|exposure) (\d+(?:\.\d+)?)", label))
            settings, on_grid = {"noise_std": noise, "exposure_concentration": exposure, "n_items": 1000}, True
            name = "-".join(f"{k}{v}" for k, v in settings.items())
        worlds.append({"name": name, "settings": settings, "on_grid": on_grid, "has_results": True})
        for column, text in zip(header[1:], cells[1:]):
            method = REGIME_METHODS[column]
            match = re.match(rf"^\**({NUMBER})\**(?: \(({NUMBER})\))?$", text)
            number = float(match.group(1))
            setting = {"lam": float(match.group(2))} if match.group(2) else {}
            value, delta = (number, 0.0) if method == "sft" else (None, number)
            records.append({"world": name, "world_settings": settings, "on_grid": on_grid, "method": method,
                            "selection": "offline", "setting": setting, "seeds": 1,
                            "value": {"test/true_reward@10": value}, "delta": {"test/true_reward@10": delta}})
    return {"name": "sim_regimes", "config": "configs/experiments/sim_regimes.yaml", "reference": "sft",
            "monitor": "val/ndcg@10", "oracle_monitor": "val/true_reward@10", "axes": REGIME_AXES,
            "heatmap": ["noise_std", "exposure_concentration"], "several_settings": ["exp_sft"], "digits": 3,
            "worlds": worlds, "rows": records}


def main(readme_path: str) -> None:
    readme = Path(readme_path).read_text()
    for folder, (heading, seeds) in STUDIES.items():
        out = HERE / folder
        out.mkdir(exist_ok=True)
        rows = convert(readme, heading, seeds)
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(f"{out / 'results.json'}: {len(rows)} rows")
    out = HERE / "regime-map"
    out.mkdir(exist_ok=True)
    (out / "regimes.json").write_text(json.dumps(regime_summary(readme), indent=2) + "\n")
    print(f"{out / 'regimes.json'}")


if __name__ == "__main__":
    main(sys.argv[1])
