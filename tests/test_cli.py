"""The real `recpost` entry point: fit -> best checkpoint -> test -> test_metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import latest_run, recpost, write_tiny_interactions

METRICS = ["ndcg@10", "ndcg@50", "hr@10", "hr@50", "mrr", "ndcg@10_liked", "hr@10_liked", "rating@10", "coverage@10"]


@pytest.fixture
def fitted(tiny_config: Path) -> tuple[Path, Path]:
    out = recpost("fit", "--config", str(tiny_config))
    assert out.returncode == 0, out.stderr[-3000:]
    run = latest_run(tiny_config.parent / "runs")
    return tiny_config, run


@pytest.mark.slow
def test_fit_keeps_the_best_validation_checkpoint_and_logs_metrics(fitted):
    _, run = fitted
    assert (run.best_checkpoint).is_file()
    header = run.metrics_csv.read_text().splitlines()[0].split(",")
    assert {f"val/{m}" for m in METRICS} <= set(header)
    assert "train/loss" in header


@pytest.mark.slow
def test_checkpoint_loads_with_weights_only_and_carries_the_catalog_hash(fitted):
    _, run = fitted
    ckpt = torch.load(run.best_checkpoint, weights_only=True)
    assert len(ckpt["hyper_parameters"]["item_map_hash"]) == 16
    assert ckpt["hyper_parameters"]["n_items"] == 40


@pytest.mark.slow
def test_test_writes_flat_test_metrics_json_and_prints_its_path(fitted):
    cfg, run = fitted
    out = recpost("test", "--config", str(cfg), "--ckpt_path", str(run.best_checkpoint))
    assert out.returncode == 0, out.stderr[-3000:]
    path = latest_run(cfg.parent / "runs").metrics_json("test")
    assert str(path) in out.stdout
    metrics = json.loads(path.read_text())
    assert {f"test/{m}" for m in METRICS} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert 0.0 < metrics["test/hr@50"] <= 1.0
    # per-user rows for paired comparisons: one per test user, averaging to the reported metrics
    header, *rows = (path.parent / "test_per_user.csv").read_text().splitlines()
    cols = header.split(",")
    assert cols[:2] == ["user_index", "ndcg@10"] and len(rows) == metrics["test/n_users"] == 101
    values = [[float(v) for v in r.split(",")] for r in rows]
    assert sorted({int(v[0]) for v in values}) == [int(v[0]) for v in values]
    for name in ("ndcg@10", "hr@10", "mrr"):
        j = cols.index(name)
        assert sum(v[j] for v in values) / len(values) == pytest.approx(metrics[f"test/{name}"], abs=1e-5)


@pytest.mark.slow
def test_checkpoint_from_another_catalog_is_rejected(fitted, tmp_path):
    cfg, run = fitted

    other = write_tiny_interactions(tmp_path / "other.csv", n_items=45, seed=1)
    out = recpost("test", "--config", str(cfg), "--data.source.init_args.path", str(other),
                  "--ckpt_path", str(run.best_checkpoint))
    assert out.returncode == 2
    assert "another item catalog" in out.stderr
    assert "Traceback" not in out.stderr


def test_print_config_shows_the_linked_model_and_data(tiny_config):
    out = recpost("fit", "--config", str(tiny_config), "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: recpost.methods.SFT" in out.stdout
    assert "class_path: recpost.data.Table" in out.stdout


def test_bad_max_len_is_one_clear_line(tiny_config):
    out = recpost("fit", "--config", str(tiny_config), "--data.max_len", "1")
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "max_len" in lines[-1]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_predict_writes_top10_per_user_with_source_ids(fitted):
    cfg, run = fitted
    out = recpost("predict", "--config", str(cfg), "--ckpt_path", str(run.best_checkpoint))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = latest_run(cfg.parent / "runs").predictions_csv.read_text().splitlines()
    assert lines[0] == "user_id,rank,item_id,score"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 101 * 10
    assert {r[0] for r in rows} == {f"u{i}" for i in range(101)}
    assert all(r[2].startswith("i") for r in rows)
    # no user is recommended an item they already had
    history = {}
    for line in (cfg.parent / "tiny.csv").read_text().splitlines()[1:]:
        u, i, *_ = line.split(",")
        history.setdefault(u, set()).add(i)
    assert all(r[2] not in history[r[0]] for r in rows)


def test_bad_method_setting_is_one_clear_line_not_a_traceback(tiny_config):
    out = recpost("fit", "--config", str(tiny_config), "--model", "recpost.methods.ExpSFT", "--model.init_args.lam", "0")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: model.lam must be > 0")
    assert "Traceback" not in out.stderr
