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
import math
import statistics
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from recpost.experiment import figures
from recpost.data import RecDataModule
from recpost.experiment.plan import Plan, Stage
from recpost.experiment.stats import fmt, paired_bootstrap
from recpost.experiment.study import Study
from recpost.methods import PPO

TABLE_METRICS = ["ndcg@10", "hr@10", "ndcg@10_liked", "hr@10_liked", "rating@10", "coverage@10", "true_reward@10",
                 "rm_reward@10", "eval_rm_reward@10", "judge_reward@10", "judge_reward@10_std"]
# The metrics of the second test over every target (a study with eval_min_rating), as test_all/<metric>.
ALL_TARGET_METRICS = ["ndcg@10", "hr@10"]
# Columns compared against the reference with a paired bootstrap over users (those present in the output).
PAIRED_COLUMNS = ["test/ndcg@10", "test_all/ndcg@10", "test/true_reward@10", "test/judge_reward@10"]
RM_METRICS = ["rmse", "mae", "rmse_global_mean", "rmse_item_mean", "rmse_user_mean"]
# The reward model also ranks (its predicted rating of every item): its ranking metrics, for reference.
RM_RANKING_METRICS = ["ndcg@10", "ndcg@10_liked", "hr@10", "true_reward@10"]
# Rows of reward models (the study's, the evaluator, the ensemble's other members, the judges): no policy.
RM_METHODS = ("reward_model", "eval_reward_model", "reward_ensemble", "judge")
JUDGE_NOTE = ("`judge_reward@10`: the judges' mean predicted rating of the top 10 (K reward models trained on other "
              "seeds and bootstrap resamples of the users than any RM a method trains against), mean ± std over "
              "seeds; `judge_reward@10_std`: its spread across the judges (std of the K judges' means), averaged "
              "over seeds. A policy the training RM likes but the judges do not is exploiting the training RM.")
ALL_TARGETS_NOTE = ("`val/` and `test/`: only the users whose held-out target is rated >= the study's "
                    "`eval_min_rating` (the paper's protocol; settings and epochs chosen on it); `test_all/`: the "
                    "same checkpoints tested on every user's target.")
# The oracle selection metric (simulator only) and the test metrics its table compares.
ORACLE_MONITOR = "val/true_reward@10"
ORACLE_METRICS = ["test/true_reward@10", "test/true_reward_sampled"]
ONE_SEED_NOTE = ("With one seed an interval resamples test users only, not training runs (their seed-to-seed "
                 "variance is not in it), so no difference is marked `*`; run `--seeds 2` or more for significance marks.")


class Report:
    """The rows of a plan's stages as they finish, written out after each one."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.rows: list[dict] = []
        self.per_user: dict[tuple, dict] = {}  # (method, setting json, seed) -> per-user test rows
        self.curve_labels = {m.name: "PPO rollouts (training batches)" if issubclass(m.method_class, PPO)
                             else "training batches" for m in plan.study.methods}

    def add(self, stage: Stage, result: dict) -> None:
        row = {"method": stage.method, "setting": stage.setting, "seed": stage.seed, "status": result["status"],
               **({"error": result["error"]} if "error" in result else {}), **result.get("metrics", {})}
        if result.get("metrics_csv"):
            row["metrics_csv"] = result["metrics_csv"]
        self.rows.append(row)
        per_user = _read_per_user(result.get("per_user"))
        for user, values in _read_per_user(result.get("per_user_test_all")).items():  # every target's test
            per_user.setdefault(user, {}).update({f"test_all/{k}": v for k, v in values.items()})
        self.per_user[(stage.method, json.dumps(stage.setting, sort_keys=True), stage.seed)] = per_user

    def write(self) -> None:
        study = self.plan.study
        write_results(self.rows, self.plan.results_dir, study.monitor, study.monitor_mode, self.per_user,
                      curve_labels=self.curve_labels)

    def finish(self) -> None:
        """The tables and figures, and the ExpSFT weight distribution of the study's data."""
        self.write()
        weight_figure(self.plan.study, self.plan.results_dir / "figures" / "exp_sft_weights.png")


def write_results(rows: list[dict], out: Path, monitor: str, mode: str = "max", per_user: dict | None = None,
                  reference: str = "sft", curve_labels: Mapping[str, str] | None = None) -> None:
    """results.json / results.csv (one row per method, setting, seed), results.md (mean ± std over
    seeds, best per column in bold, paired-bootstrap differences to ``reference``) and figures/.

    ``per_user`` maps (method, setting json, seed) to the per-user test rows of that run (the metrics of
    the test over every target as ``test_all/<metric>``);
    ``curve_labels`` the x-axis label of each method's training curves.
    """
    per_user = per_user or {}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], json.dumps(r["setting"], sort_keys=True)), []).append(r)
    policy_rows = [r for r in rows if r["method"] not in RM_METHODS]
    policy = {k: v for k, v in groups.items() if k[0] not in RM_METHODS}
    _choose(policy_rows, policy, monitor, mode)
    oracle = monitor != ORACLE_MONITOR and any(ORACLE_MONITOR in r for r in policy_rows)
    if oracle:
        _choose(policy_rows, policy, ORACLE_MONITOR, "max", flag="oracle_chosen")
    for r in rows:
        r.setdefault("chosen", r["method"] in RM_METHODS)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    keys = sorted({k for r in rows for k in r} - {"method", "setting", "seed", "status", "chosen", "error", "metrics_csv"})
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "setting", "seed", "status", "chosen", *keys])
        for r in rows:
            w.writerow([r["method"], json.dumps(r["setting"]), r["seed"], r["status"], r["chosen"],
                        *[r.get(k, "") for k in keys]])
    lines = _policy_table(rows, groups, monitor, mode, per_user, reference)
    if oracle:
        lines += ["", *_oracle_table(policy, monitor)]
    rm_rows = [r for r in rows if r["method"] in RM_METHODS]
    if rm_rows:
        lines += ["", *_rm_table(rm_rows), *_rm_error_correlation(per_user)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    figures.write_all(rows, out / "figures", curve_labels)


def weight_figure(study: Study, path: Path) -> Path | None:
    """The ExpSFT weight distribution per lambda of the grid, on this study's training targets."""
    lams = sorted({s["lam"] for m in study.methods for s in m.settings() if "lam" in s})
    if not lams:
        return None
    return figures.weight_distribution(train_target_rewards(study), lams, path)


def train_target_rewards(study: Study) -> np.ndarray:
    """The reward of every training target of the study's data ``[N]`` (its DataModule built from the
    ``data:`` sections of the study's base configs, as ``recpost fit`` composes them)."""
    return RecDataModule.from_configs(study.base_configs).train_target_rewards()


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


def _oracle_table(policy: dict, monitor: str) -> list[str]:
    """Per method, the setting chosen on ``monitor`` and the one chosen on :data:`ORACLE_MONITOR`, with their
    test true rewards (mean ± std over seeds) and the difference of the means: what choosing offline costs."""
    cols = [c for c in ORACLE_METRICS if any(c in r for rs in policy.values() for r in rs)]
    header = ["method", f"setting chosen on {monitor}", f"setting chosen on {ORACLE_MONITOR}",
              *[f"{c} {how}" for c in cols for how in ("(offline choice)", "(oracle choice)", "Δ (oracle − offline)")]]
    lines = [f"Oracle selection ({ORACLE_MONITOR}, the simulator's true reward of the validation top 10) — not "
             f"available offline: each method's setting chosen on it instead of {monitor} (each run's epoch is still "
             f"the one {monitor} chose, the checkpoint tested). Δ is what choosing on {monitor} costs the method.", "",
             f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for method in dict.fromkeys(m for m, _ in policy):
        picked = [next((k for k, rs in policy.items() if k[0] == method and rs[0].get(flag)), None)
                  for flag in ("chosen", "oracle_chosen")]
        cells = [_setting_text(k) for k in picked]
        for c in cols:
            values = [[r.get(c, math.nan) for r in policy[k] if r["status"] == "ok"] if k else [] for k in picked]
            means = [statistics.mean(v) if (v := [x for x in vs if not math.isnan(x)]) else math.nan for vs in values]
            diff = means[1] - means[0]
            cells += [fmt(values[0]), fmt(values[1]), "-" if math.isnan(diff) else f"{diff:+.4f}"]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return lines


def _setting_text(key: tuple | None) -> str:
    """A group's setting as ``lam=0.5, ...`` (``-`` for the default setting, ``none`` for no group)."""
    if key is None:
        return "none"
    return ", ".join(f"{k}={v}" for k, v in json.loads(key[1]).items()) or "-"


def _policy_table(rows, groups, monitor, mode, per_user, reference) -> list[str]:
    policy = {k: v for k, v in groups.items() if k[0] not in RM_METHODS}
    policy_rows = [r for rs in policy.values() for r in rs]
    wanted = [f"test/{m}" for m in TABLE_METRICS] + [f"test_all/{m}" for m in ALL_TARGET_METRICS]
    cols = [monitor, *[c for c in wanted if any(c in r for r in policy_rows)]]
    paired = [c for c in PAIRED_COLUMNS if c in cols]
    stats = {key: {c: [r.get(c, math.nan) for r in rs if r["status"] == "ok"] for c in cols} for key, rs in policy.items()}
    best = {}
    for c in cols:
        if c.endswith("_std"):  # a spread: neither end is better
            continue
        means = {key: statistics.mean(v) for key, s in stats.items() if (v := [x for x in s[c] if not math.isnan(x)])}
        if means:
            lower = c == monitor and mode == "min"
            best[c] = (min if lower else max)(means, key=means.get)
    header = ["method", "setting", "seeds", *cols, *[f"Δ {c} vs {reference} [95% CI]" for c in paired]]
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    n_settings = {}
    for method, _ in policy:
        n_settings[method] = n_settings.get(method, 0) + 1
    one_seed = False
    for key, rs in policy.items():
        method, setting = key
        ok = [r for r in rs if r["status"] == "ok"]
        mark = " **(chosen on val)**" if rs[0].get("chosen") and n_settings[method] > 1 else ""
        cells = []
        for c in cols:
            cell = fmt(stats[key][c])
            cells.append(f"**{cell}**" if best.get(c) == key and cell != "-" else cell)
        for c in paired:
            cell, seeds = _paired_cell(rs, method, setting, _per_user_key(c), per_user, reference)
            one_seed |= seeds == 1
            cells.append(cell)
        shown = ", ".join(f"{k}={v}" for k, v in json.loads(setting).items()) or "-"
        lines.append(f"| {method} | {shown}{mark} | {len(ok)}/{len(rs)} | {' | '.join(cells)} |")
    notes = [note for note, shown in ((ALL_TARGETS_NOTE, any(c.startswith("test_all/") for c in cols)),
                                      (JUDGE_NOTE, "test/judge_reward@10" in cols), (ONE_SEED_NOTE, one_seed)) if shown]
    return lines + [line for note in notes for line in ("", note)]


def _per_user_key(column: str) -> str:
    """The per-user row key of a table column: ``test/ndcg@10`` -> ``ndcg@10``; ``test_all/...`` as it is."""
    split, _, metric = column.partition("/")
    return metric if split == "test" else column


def _paired_cell(rs, method, setting, metric, per_user, reference) -> tuple[str, int]:
    """The cell ``mean [low, high]`` (`` *`` when the interval excludes 0 and comes from >= 2 seeds)
    and the number of seeds it pairs (0 when there is no interval)."""
    if method == reference:
        return "0 (reference)", 0
    pairs = []
    ref_setting = json.dumps({}, sort_keys=True)
    for r in rs:
        mine = per_user.get((method, setting, r["seed"]))
        ref = per_user.get((reference, ref_setting, r["seed"]))
        if mine and ref:
            pairs.append((mine, ref))
    res = paired_bootstrap(pairs, metric)
    if res is None:
        return "-", 0
    mean, low, high = res
    sig = " *" if len(pairs) >= 2 and not low <= 0.0 <= high else ""
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]{sig}", len(pairs)


def _rm_table(rm_rows: list[dict]) -> list[str]:
    cols = [f"test/{m}" for m in RM_METRICS + RM_RANKING_METRICS if any(f"test/{m}" in r for r in rm_rows)]
    lines = ["Reward models: rating regression on the test targets (RMSE, MAE: lower is better; the three mean "
             "predictors for reference), and the ranking metrics of the RM used as a policy (top-10 predicted ratings); "
             "mean ± std over its runs (seeds, and ensemble members or judges):", "",
             f"| reward model | runs | {' | '.join(cols)} |", "|" + "---|" * (2 + len(cols))]
    for method in RM_METHODS:
        rs = [r for r in rm_rows if r["method"] == method]
        if rs:
            ok = [r for r in rs if r["status"] == "ok"]
            cells = [fmt([r.get(c, math.nan) for r in ok]) for c in cols]
            lines.append(f"| {method} | {len(ok)}/{len(rs)} | {' | '.join(cells)} |")
    return lines


def _rm_error_correlation(per_user: dict) -> list[str]:
    """A sentence per independent reward model (the evaluator, the judges) with the correlation, over test
    users, of its and the training reward model's signed errors (per-user ``err``), averaged over seeds
    (and judges): how far it is an independent judge of a policy that exploits the training RM's errors."""
    lines = []
    for method, who, whose, runs in (("eval_reward_model", "the evaluator", "the evaluator's", "seeds"),
                                     ("judge", "a judge", "the judges'", "judges x seeds")):
        corrs = []
        for (other_method, _, seed), other in per_user.items():
            rows = per_user.get(("reward_model", json.dumps({}), seed))
            users = sorted(set(rows or {}) & set(other)) if other_method == method else []
            if users and all("err" in rows[u] and "err" in other[u] for u in users):
                a = np.array([rows[u]["err"] for u in users])
                b = np.array([other[u]["err"] for u in users])
                if a.std() > 0 and b.std() > 0:
                    corrs.append(float(np.corrcoef(a, b)[0, 1]))
        if corrs:
            spread = f" ({runs}: {', '.join(f'{c:.3f}' for c in corrs)})" if len(corrs) > 1 else ""
            lines += ["", f"Correlation of {whose} and the training reward model's errors on the test targets: "
                          f"{np.mean(corrs):.3f}{spread}. 1 would make {who} a copy of the training RM, blind to a "
                          "policy that exploits its errors."]
    return lines
