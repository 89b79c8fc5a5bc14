"""results.md as a pure function of results.json: ``recpost experiment`` writes the rows, then this
module's rendering of them; ``recpost report DIR`` (:mod:`.rerender`) renders the same file again, byte for byte.

Everything a table shows is a field of the rows. The runner computes what needs more than the rows (the
paired bootstrap over per-user results, the reward models' error correlations, the figures) and stores it in
them (:mod:`.report`): ``chosen`` / ``oracle_chosen`` (the settings chosen on validation), ``monitor`` /
``monitor_mode`` (what chose them), ``reference``, ``reference_setting`` (its setting chosen on validation)
and ``intervals`` (each Δ column's mean difference to the reference and its 95% interval), ``rm_error_corr``
(an evaluator's or a judge's error correlation with the training RM), ``figures`` (the figures that show the
row's method), and the budget and selection of the run: ``trials``, ``chosen_step``, ``val_at_start``.

A study that tried several settings of a method opens with a summary: each method's row at its setting
chosen on validation, with the columns a verdict reads (:data:`SUMMARY_KEYS`, the Δ intervals); the full table
of every setting follows.

Columns are listed once, in :data:`POLICY_COLUMNS` and :data:`RM_COLUMNS`: a new row field becomes a column
by adding it there, and a column shows when some row has its field.

A row is one run (one seed), or, in a snapshot rebuilt from an old table whose per-seed values are gone, a
summary of several runs: its metric values are ``{"mean": m, "std": s}`` and ``runs`` / ``runs_ok`` count
the runs it stands for (absent when unknown).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass

from recpost.experiment.judge_table import judge_tables


@dataclass(frozen=True)
class Column:
    """A table column: the row field it shows, its decimals, and whether its best mean is bold."""

    key: str
    digits: int = 4
    bold: bool = True


TABLE_METRICS = ["ndcg@10", "hr@10", "ndcg@10_liked", "hr@10_liked", "rating@10", "coverage@10", "true_reward@10",
                 "rm_reward@10", "eval_rm_reward@10", "judge_reward@10", "judge_reward@10_std"]
# The metrics of the second test over every target (a study with eval_min_rating), as test_all/<metric>.
ALL_TARGET_METRICS = ["ndcg@10", "hr@10"]
# The policy table's columns after the selection metric, in order. A spread (``_std``) is never bold:
# neither end is better.
POLICY_COLUMNS = [Column("val_at_start", bold=False),  # the selection metric before any update (the fair protocol)
                  *(Column(f"test/{m}", bold=not m.endswith("_std")) for m in TABLE_METRICS),
                  *(Column(f"test_all/{m}") for m in ALL_TARGET_METRICS)]
# Columns of one value per run, shown as they are (seed order), after the seeds column: the settings the method
# tried per seed and the optimiser steps of each run's chosen checkpoint (0: the starting policy kept).
RUN_COLUMNS = ["trials", "chosen_step"]
# Columns compared against the reference with a paired bootstrap over users (those present in the output).
PAIRED_COLUMNS = ["test/ndcg@10", "test_all/ndcg@10", "test/true_reward@10", "test/judge_reward@10"]
RM_METRICS = ["rmse", "mae", "rmse_global_mean", "rmse_item_mean", "rmse_user_mean"]
# The reward model also ranks (its predicted rating of every item): its ranking metrics, for reference.
RM_RANKING_METRICS = ["ndcg@10", "ndcg@10_liked", "hr@10", "true_reward@10"]
RM_COLUMNS = [Column(f"test/{m}", bold=False) for m in RM_METRICS + RM_RANKING_METRICS]
# Rows of reward models (the study's, the evaluator, the ensemble's other members, the judges): no policy.
RM_METHODS = ("reward_model", "eval_reward_model", "reward_ensemble", "judge")
# The oracle selection metric (simulator only) and the test metrics its table compares.
ORACLE_MONITOR = "val/true_reward@10"
ORACLE_METRICS = ["test/true_reward@10", "test/true_reward_sampled"]
DEFAULT_MONITOR = ("val/ndcg@10", "max")
DEFAULT_REFERENCE = "sft"

JUDGE_NOTE = ("`judge_reward@10`: the judges' mean predicted rating of the top 10 (K rating models, each trained on "
              "its own seed and bootstrap resample of the users; their kinds and how far they agree with the "
              "training RM: the judges' tables below), mean ± std over seeds; `judge_reward@10_std`: its spread "
              "across the judges (std of the K judges' means), averaged over seeds. A policy the training RM likes "
              "but judges that can disagree with it do not is exploiting the training RM.")
ALL_TARGETS_NOTE = ("`val/` and `test/`: only the users whose held-out target is rated >= the study's "
                    "`eval_min_rating` (the paper's protocol; settings and epochs chosen on it); `test_all/`: the "
                    "same checkpoints tested on every user's target.")
ONE_SEED_NOTE = ("With one seed an interval resamples test users only, not training runs (their seed-to-seed "
                 "variance is not in it), so no difference is marked `*`; run `--seeds 2` or more for significance marks.")
SELECTION_NOTE = ("`trials`: settings of the method tried in each seed (the same budget for every method); "
                  "`chosen_step`: optimiser steps of each seed's chosen checkpoint, 0 when no update beat the starting "
                  "policy (validated before the first update, and kept); `val_at_start`: the selection metric of the "
                  "starting policy, which no chosen checkpoint falls below.")
# The summary table's columns after the monitor (those present): what a verdict reads.
SUMMARY_KEYS = ["val_at_start", "test/ndcg@10", "test/true_reward@10", "test/rm_reward@10", "test/judge_reward@10",
                "test_all/ndcg@10"]
SUMMARY_NOTE = ("Each method at its setting chosen on validation (every setting and metric: the table after this "
                "one, whose notes explain the columns).")
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REGIMES_JSON = "regimes.json"
REGIMES_MD = "regimes.md"


def render_results(rows: list[dict]) -> str:
    """The text of results.md: the policy table, the oracle selection (simulator), the reward models, figures."""
    groups = _groups(rows)
    policy = {k: v for k, v in groups.items() if k[0] not in RM_METHODS}
    lines = []
    if policy and any(n > 1 for n in _settings_per_method(policy).values()):
        lines = [*_policy_table(_chosen(policy), SUMMARY_KEYS), ""]
    lines += _policy_table(policy) if policy else []
    if any("oracle_chosen" in r for rs in policy.values() for r in rs):
        lines += ["", *_oracle_table(policy)]
    rm_rows = [r for r in rows if r["method"] in RM_METHODS]
    if rm_rows:
        lines += ["", *_rm_table(rm_rows), *_rm_error_correlation(rm_rows)]
    judges = judge_tables(rows)  # the panel and its agreement with the training RM (judge_table.py)
    if judges:
        lines += ["", *judges]
    figures = list(dict.fromkeys(f for r in rows for f in r.get("figures", [])))
    if figures:
        lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in figures)]
    return "\n".join(lines).lstrip("\n") + "\n"


def setting_text(setting: dict) -> str:
    """A setting as ``lam=0.5, ...`` (``-`` for the method's default setting)."""
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "-"


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The rows per (method, setting as sorted JSON), in the order they first appear."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], json.dumps(r["setting"], sort_keys=True)), []).append(r)
    return groups


def _summary(rows: list[dict], key: str) -> tuple[float, float | None] | None:
    """(mean, std over runs; None for one run) of ``key`` over the finished runs, or None when none has it."""
    ok = [r for r in rows if r["status"] == "ok"]
    summaries = [r[key] for r in ok if isinstance(r.get(key), dict)]
    if summaries:
        return summaries[0]["mean"], summaries[0].get("std")
    values = [r[key] for r in ok if _is_number(r.get(key)) and not math.isnan(r[key])]
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(summary: tuple[float, float | None] | None, digits: int = 4) -> str:
    """``mean ± std`` over runs, one run's value as it is, ``-`` for none."""
    if summary is None:
        return "-"
    mean, std = summary
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _runs(rows: list[dict]) -> str:
    """Finished / attempted runs of a group (``-`` for a summary row that does not say)."""
    if len(rows) == 1 and "runs" in rows[0]:
        return f"{rows[0]['runs_ok']}/{rows[0]['runs']}" if "runs_ok" in rows[0] else "-"
    if any(isinstance(v, dict) and "mean" in v for v in rows[0].values()):
        return "-"
    return f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)}"


def _settings_per_method(policy: dict[tuple[str, str], list[dict]]) -> Counter[str]:
    return Counter(method for method, _ in policy)


def _chosen(policy: dict[tuple[str, str], list[dict]]) -> dict[tuple[str, str], list[dict]]:
    """Each method's setting chosen on validation (a method of one setting: that one)."""
    n_settings = _settings_per_method(policy)
    return {key: rs for key, rs in policy.items() if n_settings[key[0]] == 1 or rs[0].get("chosen")}


def _policy_table(policy: dict[tuple[str, str], list[dict]], keys: list[str] | None = None) -> list[str]:
    """The policy table: every setting's row, or (``keys``: the columns to keep after the monitor) the summary of
    the settings chosen on validation, which comes first."""
    first = next(iter(policy.values()))[0]
    monitor, mode = first.get("monitor", DEFAULT_MONITOR[0]), first.get("monitor_mode", DEFAULT_MONITOR[1])
    reference = first.get("reference", DEFAULT_REFERENCE)
    present = {k for rs in policy.values() for r in rs for k in r}
    cols = [Column(monitor), *(c for c in POLICY_COLUMNS if c.key in present and c.key != monitor
                               and (keys is None or c.key in keys))]
    # Δ columns where the runner paired the runs (rows written before it did, or snapshots of tables without
    # intervals, have no ``intervals``).
    paired = [c for c in PAIRED_COLUMNS if c in present and c in {col.key for col in cols}] if "intervals" in present else []
    stats = {key: {c.key: _summary(rs, c.key) for c in cols} for key, rs in policy.items()}
    best = {}
    for c in cols:
        means = {key: s[c.key][0] for key, s in stats.items() if s[c.key] is not None}
        if c.bold and means:
            best[c.key] = (min if c.key == monitor and mode == "min" else max)(means, key=means.get)
    per_run = [c for c in RUN_COLUMNS if c in present]
    header = ["method", "setting", "seeds", *per_run, *(c.key for c in cols),
              *(f"Δ {c} vs {reference} [95% CI]" for c in paired)]
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    if keys is not None:
        lines.insert(0, SUMMARY_NOTE + "\n")
    n_settings = _settings_per_method(policy)
    one_seed = False
    for key, rs in policy.items():
        method, setting = key
        mark = " **(chosen on val)**" if rs[0].get("chosen") and n_settings[method] > 1 else ""
        cells = [_per_run_cell(rs, c) for c in per_run]
        for c in cols:
            cell = _cell(stats[key][c.key], c.digits)
            cells.append(f"**{cell}**" if best.get(c.key) == key and cell != "-" else cell)
        for c in paired:
            is_reference = method == reference and json.loads(setting) == rs[0].get("reference_setting", {})
            cell, seeds = _paired_cell(rs[0], c, is_reference)
            one_seed |= seeds == 1
            cells.append(cell)
        lines.append(f"| {method} | {setting_text(json.loads(setting))}{mark} | {_runs(rs)} | {' | '.join(cells)} |")
    if keys is not None:
        return lines
    keys = [c.key for c in cols]
    notes = [note for note, shown in ((SELECTION_NOTE, bool(per_run)),
                                      (ALL_TARGETS_NOTE, any(k.startswith("test_all/") for k in keys)),
                                      (JUDGE_NOTE, "test/judge_reward@10" in keys), (ONE_SEED_NOTE, one_seed)) if shown]
    return lines + [line for note in notes for line in ("", note)]


def _per_run_cell(rows: list[dict], key: str) -> str:
    """The finished runs' values of ``key`` in seed order (one value when they agree, as equal budgets do)."""
    values = [r[key] for r in sorted(rows, key=lambda r: r.get("seed", 0)) if r["status"] == "ok" and _is_number(r.get(key))]
    if not values:
        return "-"
    return str(values[0]) if key == "trials" and len(set(values)) == 1 else ", ".join(map(str, values))


def _paired_cell(row: dict, column: str, is_reference: bool) -> tuple[str, int]:
    """The cell ``mean [low, high]`` (`` *`` when the interval excludes 0 and comes from >= 2 seeds)
    and the number of seeds it pairs (0 when there is no interval)."""
    if is_reference:
        return "0 (reference)", 0
    interval = row.get("intervals", {}).get(column)
    if interval is None:
        return "-", 0
    mean, low, high, seeds = interval["mean"], interval["low"], interval["high"], interval["seeds"]
    sig = " *" if seeds >= 2 and not low <= 0.0 <= high else ""
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]{sig}", seeds


def _oracle_table(policy: dict[tuple[str, str], list[dict]]) -> list[str]:
    """Per method, the setting chosen on the monitor and the one chosen on :data:`ORACLE_MONITOR`, with their
    test true rewards (mean ± std over seeds) and the difference of the means: what choosing offline costs."""
    monitor = next(iter(policy.values()))[0].get("monitor", DEFAULT_MONITOR[0])
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
        cells = ["none" if k is None else setting_text(json.loads(k[1])) for k in picked]
        for c in cols:
            summaries = [_summary(policy[k], c) if k else None for k in picked]
            means = [math.nan if s is None else s[0] for s in summaries]
            diff = means[1] - means[0]
            cells += [_cell(summaries[0]), _cell(summaries[1]), "-" if math.isnan(diff) else f"{diff:+.4f}"]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return lines


def _rm_table(rm_rows: list[dict]) -> list[str]:
    cols = [c for c in RM_COLUMNS if any(c.key in r for r in rm_rows)]
    lines = ["Reward models: rating regression on the test targets (RMSE, MAE: lower is better; the three mean "
             "predictors for reference), and the ranking metrics of the RM used as a policy (top-10 predicted ratings); "
             "mean ± std over its runs (seeds, and ensemble members or judges):", "",
             f"| reward model | runs | {' | '.join(c.key for c in cols)} |", "|" + "---|" * (2 + len(cols))]
    for method in RM_METHODS:
        rs = [r for r in rm_rows if r["method"] == method]
        if rs:
            cells = [_cell(_summary(rs, c.key), c.digits) for c in cols]
            lines.append(f"| {method} | {_runs(rs)} | {' | '.join(cells)} |")
    return lines


def _rm_error_correlation(rm_rows: list[dict]) -> list[str]:
    """A sentence per independent reward model (the evaluator, the judges) with the correlation, over test
    users, of its and the training reward model's signed errors (``rm_error_corr``), averaged over its runs:
    how far it is an independent judge of a policy that exploits the training RM's errors."""
    lines = []
    for method, who, whose, runs in (("eval_reward_model", "the evaluator", "the evaluator's", "seeds"),
                                     ("judge", "a judge", "the judges'", "judges x seeds")):
        corrs = [r["rm_error_corr"] for r in rm_rows if r["method"] == method and "rm_error_corr" in r]
        if corrs:
            spread = f" ({runs}: {', '.join(f'{c:.3f}' for c in corrs)})" if len(corrs) > 1 else ""
            lines += ["", f"Correlation of {whose} and the training reward model's errors on the test targets: "
                          f"{statistics.mean(corrs):.3f}{spread}. 1 would make {who} a copy of the training RM, blind "
                          "to a policy that exploits its errors."]
    return lines
