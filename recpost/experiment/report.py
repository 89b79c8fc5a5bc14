"""The results of a study: results.json / results.csv / results.md and the figures.

Model selection is on validation only: each run keeps its best ``val/<monitor>`` epoch, and for each
method the setting with the best mean validation metric over seeds is marked ``chosen``. Test
metrics are read once, from the chosen runs and all others alike, never used to choose.

On the simulator a second choice is made as an ablation, marked ``oracle_chosen``: each method's setting
chosen on the true reward of the validation top 10 (:data:`ORACLE_MONITOR`), which no real dataset has.
Its table beside the main one says how much the offline selection metric costs each method.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from recpost.core.files import atomic_open, write_text
from recpost.experiment import figures
from recpost.data import RecDataModule
from recpost.experiment.plan import Plan, Stage
# What the tables show and how is :mod:`.render`'s (results.md is a pure function of results.json); its
# names are re-exported here for the modules that import them from the report.
from recpost.experiment.render import (ALL_TARGET_METRICS, ORACLE_METRICS, ORACLE_MONITOR, PAIRED_COLUMNS,  # noqa: F401
                                       POLICY_COLUMNS, RM_METHODS, TABLE_METRICS, render_results)
from recpost.experiment.selection import selection
from recpost.experiment.stats import paired_bootstrap
from recpost.experiment.study import Study
from recpost.methods import PPO


class Report:
    """The rows of a plan's stages as they finish, written out after each one."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.rows: list[dict] = []
        self.per_user: dict[tuple, dict] = {}  # (method, setting json, seed) -> per-user test rows
        self.extra_figures: dict[str, list[Path]] = {}  # method -> figures drawn by the report itself
        self.curve_labels = {m.name: "PPO rollouts (training batches)" if issubclass(m.method_class, PPO)
                             else "training batches" for m in plan.study.methods}

    def add(self, stage: Stage, result: dict) -> None:
        row = {"method": stage.method, "setting": stage.setting, "seed": stage.seed, "status": result["status"],
               **({"error": result["error"]} if "error" in result else {}), **result.get("metrics", {})}
        if result.get("metrics_csv"):
            row["metrics_csv"] = result["metrics_csv"]
        # The budget and the selection (recpost.experiment.trials, .selection): settings of this method tried in
        # this seed, the optimiser steps of the chosen checkpoint (0: the starting policy), the monitored
        # validation metric before any update.
        row["trials"] = sum(1 for s in self.plan.stages if (s.method, s.seed) == (stage.method, stage.seed))
        row.update(selection(result.get("metrics_csv") if result["status"] == "ok" else None, stage.monitor, stage.mode))
        self.rows.append(row)
        per_user = _read_per_user(result.get("per_user"))
        for user, values in _read_per_user(result.get("per_user_test_all")).items():  # every target's test
            per_user.setdefault(user, {}).update({f"test_all/{k}": v for k, v in values.items()})
        self.per_user[(stage.method, json.dumps(stage.setting, sort_keys=True), stage.seed)] = per_user

    def write(self) -> None:
        study = self.plan.study
        write_results(self.rows, self.plan.results_dir, study.monitor, study.monitor_mode, self.per_user,
                      curve_labels=self.curve_labels, extra_figures=self.extra_figures)

    def finish(self) -> None:
        """The ExpSFT weight distribution of the study's data, then the tables and figures once more (listing it)."""
        path = weight_figure(self.plan.study, self.plan.results_dir / "figures" / "exp_sft_weights.png")
        if path is not None:
            self.extra_figures["exp_sft"] = [path]
        self.write()


def write_results(rows: list[dict], out: Path, monitor: str, mode: str = "max", per_user: dict | None = None,
                  reference: str = "sft", curve_labels: Mapping[str, str] | None = None,
                  extra_figures: Mapping[str, list[Path]] | None = None) -> None:
    """results.json / results.csv (one row per method, setting, seed), figures/ and results.md (rendered
    from results.json alone by :func:`.render.render_results`: mean ± std over seeds, best per column in
    bold, paired-bootstrap differences to ``reference``).

    What the tables need beyond the runs' metrics is computed here and stored in the rows: the choices on
    validation (``chosen``, ``oracle_chosen``, ``monitor``, ``monitor_mode``), the intervals (``reference``,
    ``intervals``), the error correlations of the evaluator and the judges (``rm_error_corr``) and the figures
    of each method (``figures``, paths relative to ``out``).

    ``per_user`` maps (method, setting json, seed) to the per-user test rows of that run (the metrics of
    the test over every target as ``test_all/<metric>``);
    ``curve_labels`` the x-axis label of each method's training curves;
    ``extra_figures`` more figures per method, written by the caller (the ExpSFT weights).
    """
    per_user = per_user or {}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], json.dumps(r["setting"], sort_keys=True)), []).append(r)
    policy_rows = [r for r in rows if r["method"] not in RM_METHODS]
    policy = {k: v for k, v in groups.items() if k[0] not in RM_METHODS}
    _choose(policy_rows, policy, monitor, mode)
    if monitor != ORACLE_MONITOR and any(ORACLE_MONITOR in r for r in policy_rows):
        _choose(policy_rows, policy, ORACLE_MONITOR, "max", flag="oracle_chosen")
    for r in rows:
        r.setdefault("chosen", r["method"] in RM_METHODS)
    _add_intervals(policy, per_user, monitor, mode, reference)
    _add_error_correlations(rows, per_user)
    drawn = figures.write_figures(rows, out / "figures", curve_labels)
    for method, paths in (extra_figures or {}).items():
        drawn.setdefault(method, []).extend(paths)
    for r in rows:
        if drawn.get(r["method"]):
            r["figures"] = [p.relative_to(out).as_posix() for p in drawn[r["method"]]]
    text = json.dumps(rows, indent=2)
    write_text(out / "results.json", text)
    keys = sorted({k for r in rows for k in r} - {"method", "setting", "seed", "status", "chosen", "error", "metrics_csv"})
    with atomic_open(out / "results.csv", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "setting", "seed", "status", "chosen", *keys])
        for r in rows:
            w.writerow([r["method"], json.dumps(r["setting"]), r["seed"], r["status"], r["chosen"],
                        *[_csv_value(r.get(k, "")) for k in keys]])
    # From the text just written, so that `recpost report` on this results.json gives the same bytes.
    write_text(out / "results.md", render_results(json.loads(text)))


def weight_figure(study: Study, path: Path) -> Path | None:
    """The ExpSFT weight distribution per lambda of the grid, on this study's training targets."""
    lams = sorted({s["lam"] for m in study.methods for s in m.settings() if "lam" in s})
    if not lams:
        return None
    return figures.weight_distribution(train_target_rewards(study), lams, path)


def train_target_rewards(study: Study) -> np.ndarray:
    """The reward of every training target ``[N]`` of the study's data (its DataModule built from the
    ``data:`` sections of the study's base configs, as ``recpost fit`` composes them)."""
    return RecDataModule.from_configs(study.base_configs).train_target_rewards()


def _csv_value(value):
    """A results.csv cell: nested values (intervals, figure lists) as JSON."""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _read_per_user(path: str | None) -> dict[int, dict[str, float]]:
    if not path or not Path(path).is_file():
        return {}
    with open(path) as fh:
        return {int(r["user_index"]): {k: float(v) for k, v in r.items() if k != "user_index"} for r in csv.DictReader(fh)}


def _choose(rows: list[dict], groups: dict, monitor: str, mode: str, flag: str = "chosen") -> None:
    """Mark each method's setting with the best mean validation metric over seeds as ``chosen`` (``flag``)."""
    best: dict[str, tuple[float, str]] = {}
    for (method, setting), rs in groups.items():
        vals = [r[monitor] for r in rs if r["status"] == "ok" and monitor in r]
        if vals:
            score = statistics.mean(vals)
            if method not in best or (score > best[method][0] if mode == "max" else score < best[method][0]):
                best[method] = (score, setting)
    for r in rows:
        r[flag] = best.get(r["method"], (None, None))[1] == json.dumps(r["setting"], sort_keys=True)


def _add_intervals(policy: dict, per_user: dict, monitor: str, mode: str, reference: str) -> None:
    """Each policy row gets the selection metric, the reference and, per paired column present in the study
    (:data:`PAIRED_COLUMNS`), its group's paired bootstrap difference to the reference (``intervals``)."""
    present = {k for rs in policy.values() for r in rs for k in r}
    columns = [c for c in PAIRED_COLUMNS if c in present]
    # The reference's setting chosen on validation (with trials, one of its learning rates; else its only one).
    ref_setting = next((s for (m, s), rs in policy.items() if m == reference and rs[0].get("chosen")),
                       json.dumps({}, sort_keys=True))
    for (method, setting), rs in policy.items():
        intervals = {}
        for column in columns if (method, setting) != (reference, ref_setting) else []:
            pairs = [(mine, ref) for r in rs if (mine := per_user.get((method, setting, r["seed"])))
                     and (ref := per_user.get((reference, ref_setting, r["seed"])))]
            res = paired_bootstrap(pairs, _per_user_key(column))
            if res is not None:
                intervals[column] = {"mean": res[0], "low": res[1], "high": res[2], "seeds": len(pairs)}
        for r in rs:
            r.update(monitor=monitor, monitor_mode=mode, reference=reference, intervals=intervals,
                     reference_setting=json.loads(ref_setting))


def _per_user_key(column: str) -> str:
    """The per-user row key of a table column: ``test/ndcg@10`` -> ``ndcg@10``; ``test_all/...`` as it is."""
    split, _, metric = column.partition("/")
    return metric if split == "test" else column


def _add_error_correlations(rows: list[dict], per_user: dict) -> None:
    """Each evaluator and judge row gets the correlation, over test users, of its and the training reward
    model's signed errors (per-user ``err``) in the same seed (``rm_error_corr``): how far it is an independent
    judge of a policy that exploits the training RM's errors."""
    for r in rows:
        if r["method"] not in ("eval_reward_model", "judge"):
            continue
        mine = per_user.get((r["method"], json.dumps(r["setting"], sort_keys=True), r["seed"])) or {}
        rm = per_user.get(("reward_model", json.dumps({}), r["seed"])) or {}
        users = sorted(set(rm) & set(mine))
        if users and all("err" in rm[u] and "err" in mine[u] for u in users):
            a = np.array([rm[u]["err"] for u in users])
            b = np.array([mine[u]["err"] for u in users])
            if a.std() > 0 and b.std() > 0:
                r["rm_error_corr"] = float(np.corrcoef(a, b)[0, 1])
