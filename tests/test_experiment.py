"""`recpost experiment`: stages, resume, results tables, bad configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recpost.errors import RecpostError
from recpost.experiment import experiment, load_study

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path, tiny_config: Path, methods: str) -> Path:
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"""
name: tiny
pretrain_config: {tiny_config}
posttrain_epochs: 1
seeds: 1
wandb: false
methods:
{methods}
""")
    return cfg


@pytest.mark.slow
def test_experiment_runs_every_stage_writes_tables_and_resumes(tmp_path, tiny_config, capsys):
    methods = f"""  sft:
    config: {ROOT / 'configs/method/sft.yaml'}
  exp_sft:
    config: {ROOT / 'configs/method/exp_sft.yaml'}
    grid:
      lam: [0.5, 2.0]
"""
    cfg = _study(tmp_path, tiny_config, methods)  # method configs inherit the tiny backbone
    out = experiment(str(cfg), output_dir=str(tmp_path / "out"))
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("base", {}), ("sft", {}), ("exp_sft", {"lam": 0.5}), ("exp_sft", {"lam": 2.0})]
    assert all(r["status"] == "ok" for r in rows), rows
    assert all("val/ndcg@10" in r and "test/ndcg@10" in r for r in rows)
    assert sum(r["chosen"] for r in rows if r["method"] == "exp_sft") == 1
    chosen = next(r for r in rows if r["chosen"] and r["method"] == "exp_sft")
    assert chosen["val/ndcg@10"] == max(r["val/ndcg@10"] for r in rows if r["method"] == "exp_sft")
    assert "| exp_sft |" in (out / "results.md").read_text()
    assert (out / "results.csv").read_text().startswith("method,setting,seed,status,chosen")
    assert (out / "figures" / "ndcg_at_10_vs_lambda.png").is_file()
    assert (out / "figures" / "exp_sft_weights.png").is_file()
    # paired bootstrap differences to SFT on the same users, from the per-user test rows
    table = (out / "results.md").read_text()
    assert "Δ test/ndcg@10 vs sft [95% CI]" in table and "| sft | - | 1/1 |" in table
    assert (out / "seed0" / "exp_sft" / "lam0.5" / "test").rglob("test_per_user.csv")
    # a second call reuses every finished stage
    before = {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")}
    experiment(str(cfg), output_dir=str(tmp_path / "out"))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")} == before


def test_failed_stage_is_recorded_not_dropped(tmp_path, tiny_config):
    bad = tmp_path / "bad_method.yaml"
    bad.write_text("model:\n  class_path: recpost.methods.ExpSFT\n  init_args:\n    lam: -1\n")
    cfg = _study(tmp_path, tiny_config, f"  exp_sft:\n    config: {bad}\n")
    out = experiment(str(cfg), output_dir=str(tmp_path / "out"))
    rows = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "failed"]


def test_empty_grid_is_rejected(tmp_path, tiny_config):
    cfg = _study(tmp_path, tiny_config, f"  exp_sft:\n    config: {ROOT / 'configs/method/exp_sft.yaml'}\n    grid:\n      lam: []\n")
    with pytest.raises(RecpostError, match="non-empty list"):
        load_study(str(cfg))


def test_output_dir_of_another_experiment_is_rejected(tmp_path, tiny_config):
    out = tmp_path / "out"
    out.mkdir()
    (out / "experiment.json").write_text(json.dumps({"name": "someone-else"}))
    cfg = _study(tmp_path, tiny_config, f"  sft:\n    config: {ROOT / 'configs/method/sft.yaml'}\n")
    with pytest.raises(RecpostError, match="another experiment"):
        experiment(str(cfg), output_dir=str(out))


def test_unknown_key_in_experiment_config_is_rejected(tmp_path, tiny_config):
    cfg = _study(tmp_path, tiny_config, f"  sft:\n    config: {ROOT / 'configs/method/sft.yaml'}\n")
    cfg.write_text(cfg.read_text() + "lambdas: [1]\n")
    with pytest.raises(RecpostError, match="unknown keys"):
        load_study(str(cfg))


def test_cli_reads_the_experiment_config_from_dash_dash_config(tmp_path):
    from tests.helpers import recpost

    cfg = tmp_path / "empty.yaml"
    cfg.write_text("name: x\n")
    out = recpost("experiment", "--config", str(cfg))
    assert out.returncode == 2
    assert "needs pretrain_config" in out.stderr and str(cfg) in out.stderr


def test_lambda_figure_is_written_from_result_rows(tmp_path):
    from recpost.figures import metric_vs_lambda

    rows = [{"method": "base", "setting": {}, "status": "ok", "test/ndcg@10": 0.1},
            {"method": "sft", "setting": {}, "status": "ok", "test/ndcg@10": 0.11}]
    rows += [{"method": "exp_sft", "setting": {"lam": lam}, "status": "ok", "seed": s, "chosen": lam == 1.0,
              "test/ndcg@10": 0.1 + 0.01 * lam + 0.001 * s} for lam in (0.5, 1.0, 2.0) for s in range(2)]
    path = metric_vs_lambda(rows, "test/ndcg@10", tmp_path / "fig.png")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metric_vs_lambda(rows[:2], "test/ndcg@10", tmp_path / "none.png") is None


def test_best_validation_epoch_follows_the_monitor_mode(tmp_path):
    from recpost.experiment import _best_val

    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,val/rmse,val/mae\n0,1.2,0.9\n1,1.0,0.8\n2,1.1,0.85\n")
    assert _best_val(csv, "val/rmse", "min") == {"val/rmse": 1.0, "val/mae": 0.8}
    assert _best_val(csv, "val/rmse", "max") == {"val/rmse": 1.2, "val/mae": 0.9}


def test_choice_on_validation_follows_the_monitor_mode(tmp_path):
    from recpost.experiment import write_results

    rows = [{"method": "m", "setting": {"lam": lam}, "seed": 0, "status": "ok", "val/rmse": v}
            for lam, v in ((1.0, 0.9), (2.0, 1.1))]
    write_results(rows, tmp_path, "val/rmse", "min")
    assert [r["chosen"] for r in json.loads((tmp_path / "results.json").read_text())] == [True, False]


@pytest.mark.slow
def test_rlhf_stages_use_the_reward_model(tmp_path, tiny_config, monkeypatch):
    # W&B off here (each offline run costs seconds per stage); the W&B wiring is tested below
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"""
name: tiny-rlhf
pretrain_config: {tiny_config}
posttrain_epochs: 1
reward_model:
  config: {ROOT / 'configs/method/reward_model.yaml'}
  epochs: 1
  evaluator: true
methods:
  ppo:
    overrides: ["--model.init_args.k=2"]
    grid:
      kl_coef: [0.1]
  dpo: {{}}
""")
    out = experiment(str(cfg), output_dir=str(tmp_path / "out"))
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["reward_model", "eval_reward_model", "base", "ppo", "dpo"]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    rm = rows[0]
    assert {"test/rmse", "test/rmse_item_mean", "test/rmse_user_mean", "test/rmse_global_mean"} <= set(rm)
    # every policy is scored by the independent evaluator RM; PPO and DPO also by their training RM
    assert all("test/eval_rm_reward@10" in r for r in rows[2:])
    assert all("val/rm_reward@10" in r and "test/rm_reward@10" in r for r in rows[3:])
    ppo_cmd = json.loads((out / "seed0" / "ppo" / "kl_coef0.1" / "stage.json").read_text())["fit_command"]
    assert ppo_cmd[ppo_cmd.index("--model.init_args.reward_model") + 1] == json.loads(
        (out / "seed0" / "reward_model" / "stage.json").read_text())["checkpoint"]
    md = (out / "results.md").read_text()
    assert "| reward_model | 1/1 |" in md and "| eval_reward_model | 1/1 |" in md
    assert (out / "figures" / "ppo_training_curves.png").is_file()
    assert (out / "figures" / "dpo_training_curves.png").is_file()
    assert not (out / "seed0" / "ppo" / "kl_coef0.1" / "wandb").exists()  # WANDB_MODE=disabled: nothing written


def test_wandb_is_offline_without_a_key_and_every_stage_gets_csv_then_wandb(tmp_path, tiny_config, monkeypatch):
    import yaml

    from recpost.experiment import Runner, _logger_config, wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    mode, message = wandb_mode()
    assert mode == "offline" and "no API key" in message and "wandb sync" in message
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == ("online", None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode()[0] == "disabled"

    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(f"name: tiny\npretrain_config: {tiny_config}\nmethods:\n  sft: {{}}\n")  # no wandb key: on
    study = load_study(str(cfg_path))
    runner = Runner(study, tmp_path / "out", total=1)
    assert runner.env["WANDB_MODE"] == "offline" and runner.wandb["group"] == "tiny"
    cfg = yaml.safe_load(_logger_config(tmp_path / "loggers.yaml", tmp_path / "fit", runner.wandb, "tiny-seed-0-sft",
                                        "abc", "fit").read_text())
    csv_logger, wandb_logger = cfg["trainer"]["logger"]
    assert csv_logger["class_path"].endswith("CSVLogger") and wandb_logger["class_path"].endswith("WandbLogger")
    assert wandb_logger["init_args"]["group"] == "tiny" and wandb_logger["init_args"]["name"] == "tiny-seed-0-sft"


@pytest.mark.parametrize("body, message", [
    ("methods:\n  bogus: {}\n", "unknown method 'bogus'"),
    ("data: nosuchdata\nmethods:\n  sft: {}\n", "unknown dataset 'nosuchdata'"),
    ("methods:\n  ppo: {}\n", "add a reward_model: section"),
    ("methods:\n  sft:\n    grid: {}\n", "grid is empty"),
    ("methods:\n  sft:\n    lr: 1\n", "unknown keys ['lr']"),
])
def test_bad_experiment_configs_are_one_clear_error(tmp_path, tiny_config, body, message):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"name: bad\npretrain_config: {tiny_config}\n{body}")
    with pytest.raises(RecpostError, match=re.escape(message)):
        load_study(str(cfg))


def test_a_method_config_that_is_not_a_recpost_method_is_rejected(tmp_path, tiny_config):
    bad = tmp_path / "m.yaml"
    bad.write_text("model:\n  class_path: torch.nn.Linear\n")
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"name: bad\npretrain_config: {tiny_config}\nmethods:\n  mine:\n    config: {bad}\n")
    with pytest.raises(RecpostError, match="is not a recpost method"):
        load_study(str(cfg))


def test_paired_bootstrap_interval_covers_a_known_difference():
    from recpost.experiment import paired_bootstrap

    ref = {u: {"ndcg@10": 0.1 * (u % 3)} for u in range(300)}
    same = paired_bootstrap([(ref, ref)], "ndcg@10")
    assert same == (0.0, 0.0, 0.0)
    better = {u: {"ndcg@10": v["ndcg@10"] + (0.05 if u % 2 else 0.0)} for u, v in ref.items()}
    mean, low, high = paired_bootstrap([(better, ref), (better, ref)], "ndcg@10")
    assert mean == pytest.approx(0.025) and 0.0 < low < 0.025 < high < 0.05
    assert paired_bootstrap([({}, ref)], "ndcg@10") is None


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_experiment_config_loads(path):
    study = load_study(str(path))
    assert study.methods and study.pretrain_config.is_file()
    assert {m.name for m in study.methods} >= {"sft", "exp_sft"}
    if any(m.needs_reward_model for m in study.methods):
        assert study.reward_model is not None


@pytest.mark.parametrize("name", ["ml1m", "ml20m", "amazon_books"])
def test_published_size_pretrain_configs_parse(name):
    from tests.helpers import recpost

    out = recpost("fit", "--config", str(ROOT / "configs" / "pretrain" / f"{name}.yaml"), "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: recpost.methods.SFT" in out.stdout
