"""`recpost report`: results.md is a pure function of results.json, the same bytes as `recpost experiment` wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recpost.core.errors import RecpostError
from recpost.experiment import render, write_results
from recpost.experiment.regime_tables import render_regimes
from recpost.experiment.render import Column, render_results
from recpost.experiment.rerender import report


def _study_rows() -> tuple[list[dict], dict]:
    """Two seeds of SFT and ExpSFT at two lambdas (true rewards: an oracle table), a reward model and an
    evaluator, with per-user test rows for the intervals and the error correlation."""
    rng = np.random.default_rng(0)
    rows, per_user = [], {}
    for seed in (0, 1):
        base = rng.uniform(0, 0.2, 200)  # [users]: the reference's per-user NDCG@10; the methods add their shift
        for method, setting, shift in (("sft", {}, 0.0), ("exp_sft", {"lam": 0.5}, 0.05), ("exp_sft", {"lam": 2.0}, 0.01)):
            rows.append({"method": method, "setting": setting, "seed": seed, "status": "ok",
                         "val/ndcg@10": 0.1 + shift + 0.01 * seed, "test/ndcg@10": 0.09 + shift,
                         "val/true_reward@10": 3.0 + 10 * shift, "test/true_reward@10": 3.1 + 10 * shift})
            per_user[(method, json.dumps(setting), seed)] = {u: {"ndcg@10": v + shift, "true_reward@10": 3 + v}
                                                             for u, v in enumerate(base)}
        err = rng.normal(0, 1, 200)
        for method, noise in (("reward_model", 0.0), ("eval_reward_model", 1.0)):
            rows.append({"method": method, "setting": {}, "seed": seed, "status": "ok", "test/rmse": 0.9 + 0.1 * noise})
            per_user[(method, "{}", seed)] = {u: {"err": e + noise * rng.normal()} for u, e in enumerate(err)}
    rows.append({"method": "exp_sft", "setting": {"lam": 2.0}, "seed": 2, "status": "failed", "error": "fit exited 1"})
    return rows, per_user


def test_report_renders_the_same_bytes_as_the_experiment_wrote(tmp_path):
    rows, per_user = _study_rows()
    write_results(rows, tmp_path, "val/ndcg@10", per_user=per_user)
    written = (tmp_path / "results.md").read_bytes()
    assert b"[95% CI]" in written and b"Oracle selection" in written and b"Correlation of the evaluator's" in written
    (tmp_path / "results.md").unlink()
    report(str(tmp_path))
    assert (tmp_path / "results.md").read_bytes() == written


def test_the_rows_carry_what_the_tables_show(tmp_path):
    rows, per_user = _study_rows()
    write_results(rows, tmp_path, "val/ndcg@10", per_user=per_user)
    saved = json.loads((tmp_path / "results.json").read_text())
    lam05 = next(r for r in saved if r["setting"] == {"lam": 0.5})
    interval = lam05["intervals"]["test/ndcg@10"]
    assert interval["mean"] == pytest.approx(0.05) and interval["seeds"] == 2 and interval["low"] <= 0.05 <= interval["high"]
    assert lam05["monitor"] == "val/ndcg@10" and lam05["reference"] == "sft" and lam05["chosen"]
    assert "figures/ndcg_at_10_vs_lambda.png" in lam05["figures"]
    assert -1 < next(r for r in saved if r["method"] == "eval_reward_model")["rm_error_corr"] < 1
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if x.startswith("| exp_sft | lam=2.0"))
    assert "| 2/3 |" in line  # the failed seed counts as attempted


def test_a_field_added_to_the_column_list_shows_in_the_table(monkeypatch):
    rows = [{"method": m, "setting": {}, "seed": s, "status": "ok", "val/ndcg@10": 0.1, "new_count": n}
            for m, n in (("sft", 4), ("ppo", 8)) for s in (0, 1)]
    assert "new_count" not in render_results(rows)
    monkeypatch.setattr(render, "POLICY_COLUMNS", [*render.POLICY_COLUMNS, Column("new_count", digits=0, bold=False)])
    table = render_results(rows).splitlines()
    assert table[0].endswith("| val/ndcg@10 | new_count |") and table[3] == "| ppo | - | 2/2 | 0.1000 ± 0.0000 | 8 ± 0 |"


def test_a_row_that_summarises_runs_renders_its_mean_and_std():
    """A snapshot rebuilt from an old table keeps only mean ± std per group, and says so in the runs column."""
    rows = [{"method": "sft", "setting": {}, "seed": None, "status": "ok", "runs": 3, "runs_ok": 3,
             "val/ndcg@10": {"mean": 0.1127, "std": 0.0049}, "reference": "sft"},
            {"method": "exp_sft", "setting": {"lam": 4.0}, "seed": None, "status": "ok", "runs": 3, "runs_ok": 3,
             "val/ndcg@10": {"mean": 0.1134, "std": 0.0045}, "chosen": True,
             "intervals": {}, "reference": "sft"}]
    rows[1]["test/ndcg@10"] = {"mean": 0.0998, "std": 0.006}
    rows[1]["intervals"]["test/ndcg@10"] = {"mean": 0.0012, "low": -0.0017, "high": 0.0042, "seeds": 3}
    table = render_results(rows).splitlines()
    assert table[3] == "| exp_sft | lam=4.0 | 3/3 | **0.1134 ± 0.0045** | **0.0998 ± 0.0060** | +0.0012 [-0.0017, +0.0042] |"


def test_report_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(RecpostError, match="results.json does not exist; give the output folder"):
        report(str(tmp_path))
    (tmp_path / "results.json").write_text('{"rows": []}')
    with pytest.raises(RecpostError, match="is not a list of result rows"):
        report(str(tmp_path))


def test_a_regime_map_folder_gets_its_regimes_md_from_its_regimes_json(tmp_path):
    record = {"world": "w", "world_settings": {"noise_std": 0.5}, "on_grid": True, "setting": {"lam": 0.5}, "seeds": 1}
    summary = {"name": "m", "config": "m.yaml", "reference": "sft", "monitor": "val/ndcg@10", "axes": {"noise_std": [0.5]},
               "heatmap": None, "several_settings": ["exp_sft"],
               "worlds": [{"name": "w", "settings": {"noise_std": 0.5}, "on_grid": True, "has_results": True}],
               "rows": [{**record, "method": "sft", "setting": {}, "selection": "offline",
                         "value": {"test/true_reward@10": 3.0}, "delta": {"test/true_reward@10": 0.0}},
                        {**record, "method": "exp_sft", "selection": "offline",
                         "value": {"test/true_reward@10": 3.25}, "delta": {"test/true_reward@10": 0.25}}]}
    (tmp_path / "regimes.json").write_text(json.dumps(summary))
    report(str(tmp_path))
    md = (tmp_path / "regimes.md").read_text()
    assert md == render_regimes(summary) and "| w | 0.5 | 3.0000 | +0.2500 (lam=0.5) |" in md
    assert "oracle, not available offline" not in md  # no oracle records: no empty table for them


def test_the_command_takes_one_folder(tmp_path, capsys):
    from recpost.cli.main import main

    rows, per_user = _study_rows()
    write_results(rows, tmp_path, "val/ndcg@10", per_user=per_user)
    main(["report", str(tmp_path)])
    assert f"results: {tmp_path / 'results.md'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path), "extra"])
    assert stop.value.code == 2 and "recpost report takes one folder" in capsys.readouterr().err
