"""`recpost experiment`: the plan and its commands, running it (resume, failures), results tables and
their statistics, bad configs."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from recpost.core.errors import RecpostError
from recpost.experiment import build_plan, experiment, load_study, write_results
from recpost.experiment.plan import CheckpointOf, resolve, with_loggers
from recpost.experiment.roles import EVALUATOR_SEED_OFFSET, evaluator_overrides
from recpost.experiment.regimes import is_regime_map
from recpost.experiment.runner import Runner
from tests.helpers import latest_run
from recpost.core.runs import LOGS_DIR, VERSION_PREFIX, RunFolder, run_folders

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


def test_failed_stage_is_recorded_not_dropped(tmp_path, tiny_config, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(Runner, "_recpost", _stand_in_cli([], fail_fit={out / "seed0" / "exp_sft" / "default"}))
    cfg = _study(tmp_path, tiny_config, f"  exp_sft:\n    config: {ROOT / 'configs/method/exp_sft.yaml'}\n")
    experiment(str(cfg), output_dir=str(out))
    rows = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "fit exited 1" in rows[1]["error"]


def test_a_bad_setting_in_a_method_config_stops_before_any_stage(tmp_path, tiny_config):
    bad = tmp_path / "bad_method.yaml"
    bad.write_text("model:\n  class_path: recpost.methods.ExpSFT\n  init_args:\n    lam: -1\n")
    cfg = _study(tmp_path, tiny_config, f"  exp_sft:\n    config: {bad}\n")
    with pytest.raises(RecpostError, match=re.escape("methods.exp_sft: model.lam must be > 0 and finite (got -1)")):
        experiment(str(cfg), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


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
    from recpost.experiment.figures import metric_vs_lambda

    rows = [{"method": "base", "setting": {}, "status": "ok", "test/ndcg@10": 0.1},
            {"method": "sft", "setting": {}, "status": "ok", "test/ndcg@10": 0.11}]
    rows += [{"method": "exp_sft", "setting": {"lam": lam}, "status": "ok", "seed": s, "chosen": lam == 1.0,
              "test/ndcg@10": 0.1 + 0.01 * lam + 0.001 * s} for lam in (0.5, 1.0, 2.0) for s in range(2)]
    path = metric_vs_lambda(rows, "test/ndcg@10", tmp_path / "fig.png")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metric_vs_lambda(rows[:2], "test/ndcg@10", tmp_path / "none.png") is None


def test_best_validation_epoch_follows_the_monitor_mode(tmp_path):
    from recpost.experiment import best_validation

    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,val/rmse,val/mae\n0,1.2,0.9\n1,1.0,0.8\n2,1.1,0.85\n")
    assert best_validation(csv, "val/rmse", "min") == {"val/rmse": 1.0, "val/mae": 0.8}
    assert best_validation(csv, "val/rmse", "max") == {"val/rmse": 1.2, "val/mae": 0.9}


def test_choice_on_validation_follows_the_monitor_mode(tmp_path):
    rows = [{"method": "m", "setting": {"lam": lam}, "seed": 0, "status": "ok", "val/rmse": v}
            for lam, v in ((1.0, 0.9), (2.0, 1.1))]
    write_results(rows, tmp_path, "val/rmse", "min")
    assert [r["chosen"] for r in json.loads((tmp_path / "results.json").read_text())] == [True, False]


def test_wandb_is_offline_without_a_key_and_every_stage_gets_csv_then_wandb(tmp_path, tiny_config, monkeypatch):
    import yaml

    from recpost.experiment import wandb_mode
    from recpost.experiment.tracking import logger_config

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
    runner = Runner(build_plan(load_study(str(cfg_path)), tmp_path / "out"))
    assert runner.env["WANDB_MODE"] == "offline" and runner.wandb["group"] == "tiny"
    cfg = yaml.safe_load(logger_config(tmp_path / "loggers.yaml", tmp_path / "fit", runner.wandb, "tiny-seed-0-sft",
                                        "abc", "fit").read_text())
    csv_logger, wandb_logger = cfg["trainer"]["logger"]
    assert csv_logger["class_path"].endswith("CSVLogger") and wandb_logger["class_path"].endswith("WandbLogger")
    assert wandb_logger["init_args"]["group"] == "tiny" and wandb_logger["init_args"]["name"] == "tiny-seed-0-sft"
    # run ids are hex digests: one of digits and an 'e' (a sim study's stage drew 8885523638e8) or digits alone
    # must reach the fit as text, read by the loader the CLI uses (it read 8885523638e8 as 8.9e17: fit refused)
    from jsonargparse import get_loader

    for run_id in ("8885523638e8", "123456789012"):
        text = logger_config(tmp_path / "ids.yaml", tmp_path / "fit", runner.wandb, "n", run_id, "fit").read_text()
        assert get_loader("yaml")(text)["trainer"]["logger"][1]["init_args"]["id"] == run_id


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


@pytest.mark.parametrize("path", [p for p in sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
                                  if not is_regime_map(str(p))], ids=lambda p: p.stem)  # regime maps: test_regimes
def test_every_shipped_experiment_config_loads(path):
    study = load_study(str(path))
    assert study.methods and study.pretrain_config.is_file()
    assert "sft" in {m.name for m in study.methods}  # every Δ column's reference
    assert {m.method_class.__name__ for m in study.methods} >= {"SFT", "ExpSFT"}
    if any(m.needs_reward_model(s) for m in study.methods for s in m.settings()):
        assert study.reward_model is not None


@pytest.mark.parametrize("name", ["ml1m", "ml20m", "amazon_books"])
def test_published_size_pretrain_configs_parse(name):
    from tests.helpers import recpost

    out = recpost("fit", "--config", str(ROOT / "configs" / "pretrain" / f"{name}.yaml"), "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: recpost.methods.SFT" in out.stdout


def _composed_config(*configs: str) -> dict:
    """The config `recpost fit` resolves from ``configs`` (paths under configs/), composed in order."""
    import yaml

    from tests.helpers import recpost

    args = [arg for c in configs for arg in ("--config", str(ROOT / "configs" / c))]
    out = recpost("fit", *args, "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    return yaml.safe_load(out.stdout)


def test_the_fast_recipe_composes_after_a_pretrain_config_and_sets_what_it_says():
    cfg = _composed_config("pretrain/ml1m.yaml", "recipe/fast.yaml")
    assert (cfg["data"]["batch_size"], cfg["data"]["length_grouping"], cfg["trainer"]["max_epochs"]) == (64, 16, 40)
    settings = cfg["model"]["init_args"]
    assert (settings["target_norm"], settings["lr"], settings["lr_schedule"], settings["warmup_steps"]) == (
        "dataset", 0.003, "cosine", 100)
    assert settings["backbone"]["d_model"] == 50  # the model is the pretrain config's


def test_the_prefixes_recipe_composes_after_a_pretrain_config_and_keeps_its_model():
    cfg = _composed_config("pretrain/ml100k.yaml", "recipe/prefixes.yaml")
    assert (cfg["data"]["train_samples"], cfg["data"]["max_len"], cfg["data"]["batch_size"]) == ("prefixes", 50, 256)
    assert cfg["trainer"]["max_epochs"] == 25
    assert cfg["model"]["init_args"]["backbone"]["name"] == "sasrec"  # the model is the pretrain config's


# ----------------------------------------------------------------------------------- the plan
def _rlhf_study(tmp_path: Path, tiny_config: Path, seeds: int = 1) -> Path:
    """RM + evaluator RM, SFT, PPO over two KL strengths, DPO on RM pairs and on logged pairs."""
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"""
name: tiny-plan
pretrain_config: {tiny_config}
posttrain_epochs: 1
seeds: {seeds}
wandb: false
reward_model:
  config: {ROOT / 'configs/method/reward_model.yaml'}
  epochs: 1
  evaluator: true
methods:
  sft: {{}}
  ppo:
    grid:
      kl_coef: [0.1, 1.0]
  dpo:
    grid:
      pair_source: [reward_model, logged]
""")
    return cfg


def test_plan_lists_every_stage_in_row_order_with_its_checkpoint_placeholders(tmp_path, tiny_config):
    plan = build_plan(load_study(str(_rlhf_study(tmp_path, tiny_config))), tmp_path / "out", seeds=2)
    names = ["reward_model", "eval_reward_model", "base", "sft/default", "ppo/kl_coef0.1", "ppo/kl_coef1.0",
             "dpo/pair_sourcereward_model", "dpo/pair_sourcelogged"]
    assert [s.name for s in plan.stages] == [f"seed{seed}/{n}" for seed in range(2) for n in names]
    stage = {s.name: s for s in plan.stages}
    base = CheckpointOf("--model.init_args.init_from", "seed1/base")
    rm = stage["seed1/reward_model"]
    assert base in rm.fit_args and rm.needs == ("seed1/base",) and (rm.monitor, rm.mode) == ("val/rmse", "min")
    # the evaluator: the RM's arguments with another seed and a bootstrap resample of the training users
    ev = stage["seed1/eval_reward_model"]
    assert ev.fit_args[ev.fit_args.index("--seed_everything") + 1] == str(1 + EVALUATOR_SEED_OFFSET)
    assert list(ev.fit_args[-2:]) == evaluator_overrides(1) == [
        "--data.train_users=bootstrap", f"--data.train_users_seed={1 + EVALUATOR_SEED_OFFSET}"]
    # every policy is tested with the evaluator RM when it exists (optional: left out if it failed)
    eval_arg = CheckpointOf("--model.init_args.eval_reward_model", "seed1/eval_reward_model", required=False)
    assert all(s.test_args == (eval_arg,) for s in plan.stages[10:16])
    # the training RM: required by PPO and by DPO on RM pairs, optional for DPO on logged pairs
    assert stage["seed1/ppo/kl_coef0.1"].fit_args[-1] == CheckpointOf("--model.init_args.reward_model", "seed1/reward_model")
    assert stage["seed1/dpo/pair_sourcelogged"].fit_args[-1].required is False
    assert not any(isinstance(a, CheckpointOf) and "reward_model" in a.flag for a in stage["seed1/sft/default"].fit_args)


def test_placeholders_resolve_to_checkpoints_and_optional_ones_drop_out(tmp_path, tiny_config):
    plan = build_plan(load_study(str(_rlhf_study(tmp_path, tiny_config))), tmp_path / "out")
    ppo = plan.stage("seed0/ppo/kl_coef0.1")
    known = {"seed0/base": "/b.ckpt", "seed0/reward_model": "/rm.ckpt", "seed0/ppo/kl_coef0.1": "/ppo.ckpt"}
    fit = resolve(ppo.fit_command, known)
    assert fit[fit.index("--model.init_args.init_from") + 1] == "/b.ckpt" and fit[-3:-2] == ["/rm.ckpt"]
    test = resolve(ppo.test_command, known)  # the evaluator RM has no checkpoint: its flag is left out
    assert "--model.init_args.eval_reward_model" not in test and test[test.index("--ckpt_path") + 1] == "/ppo.ckpt"
    assert ppo.missing({"seed0/base": "/b.ckpt"}) == ["seed0/reward_model"]
    with pytest.raises(ValueError):
        resolve(ppo.fit_args, {"seed0/base": "/b.ckpt"})


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path, tiny_config, capsys):
    out = tmp_path / "out"
    experiment(str(_rlhf_study(tmp_path, tiny_config)), output_dir=str(out), dry_run=True)
    printed = capsys.readouterr().out
    assert not out.exists()
    assert printed.count("  recpost fit ") == printed.count("  recpost test ") == 8
    assert "--model.init_args.init_from <best.ckpt of seed0/base>" in printed
    assert "[--model.init_args.eval_reward_model <best.ckpt of seed0/eval_reward_model>]" in printed
    assert "--data.train_users=bootstrap" in printed


def test_cli_dry_run_flag(tmp_path, tiny_config):
    from tests.helpers import recpost

    out = recpost("experiment", "--config", str(_rlhf_study(tmp_path, tiny_config)), "--output_dir",
                  str(tmp_path / "out"), "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[1/8] seed0/reward_model" in out.stdout and not (tmp_path / "out").exists()


def test_a_method_class_that_needs_a_reward_model_is_refused_without_one_before_anything_runs(tmp_path, tiny_config):
    # a PPO config without a reward_model key: the method class, not the YAML, says it needs one
    ppo = tmp_path / "my_ppo.yaml"
    ppo.write_text("model:\n  class_path: recpost.methods.PPO\n  init_args:\n    k: 2\n")
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"name: bad\npretrain_config: {tiny_config}\nmethods:\n  mine:\n    config: {ppo}\n")
    with pytest.raises(RecpostError, match=re.escape("methods ['mine'] train against a reward model")):
        experiment(str(cfg), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # DPO on logged pairs needs none
    cfg.write_text(f"name: ok\npretrain_config: {tiny_config}\nmethods:\n  dpo:\n    grid:\n"
                   "      pair_source: [logged]\n")
    assert not load_study(str(cfg)).methods[0].needs_reward_model({"pair_source": "logged"})


# ----------------------------------------------------------------------------------- running a plan
def _stand_in_cli(calls: list[list[str]], fail_fit: set[Path] = frozenset()):
    """Replaces ``Runner._recpost``: records the command and writes the files a real run writes."""

    def run(self, args, log, watch=None, epochs=None, label=""):
        calls.append(list(args))
        root = Path(args[args.index("--trainer.default_root_dir") + 1])
        if args[0] == "fit" and root.parent in fail_fit:
            return 1
        run = RunFolder(root / LOGS_DIR / f"{VERSION_PREFIX}{len(run_folders(root))}")
        run.checkpoints.mkdir(parents=True)
        if args[0] == "fit":
            run.best_checkpoint.write_text("weights")
            run.metrics_csv.write_text("epoch,step,val/ndcg@10,val/rmse\n0,1,0.1,0.9\n1,2,0.2,0.8\n")
        else:
            run.metrics_json("test").write_text(json.dumps({"test/ndcg@10": 0.15}))
        return 0

    return run


def test_runner_runs_the_plans_commands_then_reuses_every_stage(tmp_path, tiny_config, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(Runner, "_recpost", _stand_in_cli(calls))
    cfg, out = _rlhf_study(tmp_path, tiny_config), tmp_path / "out"
    experiment(str(cfg), output_dir=str(out))
    plan = build_plan(load_study(str(cfg)), out)
    done = {s.name: json.loads((s.directory / "stage.json").read_text()) for s in plan.stages}
    checkpoints = {name: d["checkpoint"] for name, d in done.items()}
    # each command is the plan's, placeholders filled with the checkpoints of the stages they name
    expected = [with_loggers(resolve(cmd, checkpoints), s.loggers(cmd[0]))
                for s in plan.stages for cmd in (s.fit_command, s.test_command)]
    assert sorted(calls) == sorted(expected)
    assert calls[0][0] == "fit" and calls[0][-1] == str(plan.stage("seed0/base").loggers("fit"))  # needed first
    assert all(d["fit_command"] == ["recpost", *resolve(plan.stage(n).fit_command, checkpoints)] for n, d in done.items())
    ppo = done["seed0/ppo/kl_coef0.1"]["test_command"]
    assert ppo[ppo.index("--model.init_args.eval_reward_model") + 1] == checkpoints["seed0/eval_reward_model"]
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == [s.method for s in plan.stages] and {r["status"] for r in rows} == {"ok"}
    calls.clear()
    experiment(str(cfg), output_dir=str(out))
    assert calls == []


def test_only_seed_runs_one_seeds_stages_beside_another_and_the_whole_study_reuses_them(tmp_path, tiny_config,
                                                                                         monkeypatch):
    from filelock import FileLock

    from recpost.experiment.runner import LOCK

    calls: list[list[str]] = []
    stand_in = _stand_in_cli(calls)
    out = tmp_path / "out"

    def run(self, args, *rest, **kw):  # while seed 1 runs alone, seed 0's folder and the output folder are free
        FileLock(str(out / LOCK)).acquire(timeout=0)
        FileLock(str(out / "seed0" / LOCK)).acquire(timeout=0)
        return stand_in(self, args, *rest, **kw)

    monkeypatch.setattr(Runner, "_recpost", run)
    cfg = _rlhf_study(tmp_path, tiny_config, seeds=2)
    whole = build_plan(load_study(str(cfg)), out)
    experiment(str(cfg), output_dir=str(out), only_seed=1)
    seed1 = [s for s in whole.stages if s.seed == 1]
    assert len(calls) == 2 * len(seed1) and all("seed1" in " ".join(c) and "seed0" not in " ".join(c) for c in calls)
    rows = json.loads((out / "seed1" / "results.json").read_text())
    assert [r["seed"] for r in rows] == [1] * len(seed1) and not (out / "results.json").exists()
    with FileLock(str(out / "seed1" / LOCK)):  # seed 1 busy: the whole study is refused, seed 0 alone is not
        with pytest.raises(RecpostError, match="is in use by another `recpost experiment`"):
            experiment(str(cfg), output_dir=str(out))
    monkeypatch.setattr(Runner, "_recpost", stand_in)
    calls.clear()
    experiment(str(cfg), output_dir=str(out))  # the whole study fits seed 0 only and tabulates both seeds
    assert len(calls) == 2 * (len(whole.stages) - len(seed1)) and all("seed1" not in " ".join(c) for c in calls)
    rows = json.loads((out / "results.json").read_text())
    assert sorted({r["seed"] for r in rows}) == [0, 1] and len(rows) == len(whole.stages)
    with pytest.raises(RecpostError, match=r"--only_seed 2 is not one of the study's seeds 0\.\.1"):
        experiment(str(cfg), output_dir=str(out), only_seed=2)


def test_methods_runs_those_methods_stages_and_what_they_need_and_the_whole_study_reuses_them(tmp_path, tiny_config,
                                                                                               monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(Runner, "_recpost", _stand_in_cli(calls))
    cfg, out = _rlhf_study(tmp_path, tiny_config), tmp_path / "out"
    whole = build_plan(load_study(str(cfg)), out)
    sft_only = build_plan(load_study(str(cfg)), out, methods=["sft"])
    # SFT needs the base model, whose test is scored by the evaluator RM: no RM for training, no PPO, no DPO
    assert [s.name for s in sft_only.stages] == ["seed0/eval_reward_model", "seed0/base", "seed0/sft/default"]
    assert all(s == whole.stage(s.name) for s in sft_only.stages)  # the whole study's stages, keys and folders
    assert "methods sft (and the stages they need) only" in sft_only.describe()
    experiment(str(cfg), output_dir=str(out), methods=["ppo"])
    ran = {c[c.index("--trainer.default_root_dir") + 1] for c in calls}
    ppo = build_plan(load_study(str(cfg)), out, methods=["ppo"])
    assert ran == {str(s.fit_root) for s in ppo.stages} | {str(s.test_root) for s in ppo.stages}
    assert {s.method for s in ppo.stages} == {"reward_model", "eval_reward_model", "base", "ppo"}
    assert [r["method"] for r in json.loads((out / "results.json").read_text())] == [s.method for s in ppo.stages]
    calls.clear()
    experiment(str(cfg), output_dir=str(out))  # the rest of the study; PPO's stages and what they need reused
    assert len(calls) == 2 * (len(whole.stages) - len(ppo.stages))
    for bad, says in ((["dpoo"], "--methods: 'dpoo' is not a method of tiny-plan; did you mean dpo?"),
                      ([], "--methods is empty; name some of tiny-plan's methods: sft, ppo, dpo")):
        with pytest.raises(RecpostError, match=re.escape(says)):
            experiment(str(cfg), output_dir=str(out), methods=bad)


def test_a_failed_reward_model_fails_the_stages_that_need_it_and_only_those(tmp_path, tiny_config, monkeypatch):
    calls: list[list[str]] = []
    out = tmp_path / "out"
    monkeypatch.setattr(Runner, "_recpost", _stand_in_cli(calls, fail_fit={out / "seed0" / "reward_model"}))
    experiment(str(_rlhf_study(tmp_path, tiny_config)), output_dir=str(out))
    rows = {(r["method"], json.dumps(r["setting"])): r for r in json.loads((out / "results.json").read_text())}
    assert rows[("reward_model", "{}")]["status"] == "failed"
    assert rows[("ppo", '{"kl_coef": 0.1}')]["error"] == "the reward model stage failed"
    assert rows[("dpo", '{"pair_source": "reward_model"}')]["status"] == "failed"
    logged = rows[("dpo", '{"pair_source": "logged"}')]  # runs without the RM it does not need
    assert logged["status"] == "ok" and rows[("sft", "{}")]["status"] == "ok"
    assert not any("--model.init_args.reward_model" in c for c in calls)


# ----------------------------------------------------------------------------------- statistics
def _per_user(values: list[float]) -> dict[int, dict[str, float]]:
    return {u: {"ndcg@10": v} for u, v in enumerate(values)}


def test_one_seed_gives_an_interval_but_no_significance_mark(tmp_path):
    ref = np.random.default_rng(0).uniform(0.0, 0.2, 500)
    rows = [{"method": m, "setting": {}, "seed": 0, "status": "ok", "val/ndcg@10": 0.1, "test/ndcg@10": 0.1}
            for m in ("sft", "exp_sft")]
    per_user = {("sft", "{}", 0): _per_user(list(ref)), ("exp_sft", "{}", 0): _per_user(list(ref + 0.1))}
    write_results(rows, tmp_path, "val/ndcg@10", per_user=per_user)
    md = (tmp_path / "results.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| exp_sft |"))
    assert "+0.1000 [+0.1000, +0.1000]" in line and "*" not in line  # far from 0, yet one seed: no mark
    assert "With one seed" in md


def test_several_seeds_resample_seeds_as_well_as_users():
    from recpost.experiment import paired_bootstrap

    rng = np.random.default_rng(1)
    ref = _per_user(list(rng.uniform(0.0, 0.2, 400)))
    up = {u: {"ndcg@10": r["ndcg@10"] + 0.05 + rng.normal(0, 0.01)} for u, r in ref.items()}
    down = {u: {"ndcg@10": r["ndcg@10"] - 0.03 + rng.normal(0, 0.01)} for u, r in ref.items()}
    assert paired_bootstrap([(up, ref)], "ndcg@10")[1] > 0  # each seed alone excludes 0 ...
    assert paired_bootstrap([(down, ref)], "ndcg@10")[2] < 0
    mean, low, high = paired_bootstrap([(up, ref), (down, ref)], "ndcg@10")
    assert mean == pytest.approx(0.01, abs=1e-3) and low < 0 < high  # ... the two together do not


def test_two_seeds_that_agree_get_the_significance_mark(tmp_path):
    ref = list(np.random.default_rng(0).uniform(0.0, 0.2, 500))
    rows = [{"method": m, "setting": {}, "seed": s, "status": "ok", "val/ndcg@10": 0.1, "test/ndcg@10": 0.1}
            for m in ("sft", "exp_sft") for s in (0, 1)]
    per_user = {(m, "{}", s): _per_user([v + (0.05 + 0.01 * s if m == "exp_sft" else 0.0) for v in ref])
                for m in ("sft", "exp_sft") for s in (0, 1)}
    write_results(rows, tmp_path, "val/ndcg@10", per_user=per_user)
    md = (tmp_path / "results.md").read_text()
    assert next(x for x in md.splitlines() if x.startswith("| exp_sft |")).endswith(" * |")
    assert "With one seed" not in md


def test_the_reward_model_table_reports_how_alike_the_two_reward_models_err(tmp_path):
    rng = np.random.default_rng(0)
    shared, own = rng.normal(0, 1, 300), rng.normal(0, 1, 300)
    rows = [{"method": m, "setting": {}, "seed": 0, "status": "ok", "test/rmse": 1.0}
            for m in ("reward_model", "eval_reward_model")]
    per_user = {("reward_model", "{}", 0): {u: {"err": e} for u, e in enumerate(shared)},
                ("eval_reward_model", "{}", 0): {u: {"err": e} for u, e in enumerate(shared + own)}}
    write_results(rows, tmp_path, "val/ndcg@10", per_user=per_user)
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if x.startswith("Correlation"))
    expected = np.corrcoef(shared, shared + own)[0, 1]  # ~0.71: half of the evaluator's error is its own
    assert f"{expected:.3f}" in line


# ----------------------------------------------------------------------------------- checks, lines, interrupts
def test_a_grid_key_the_method_does_not_take_is_refused_with_the_closest_one(tmp_path, tiny_config):
    cfg = _study(tmp_path, tiny_config, "  exp_sft:\n    grid:\n      lamm: [0.5]\n")
    with pytest.raises(RecpostError, match=re.escape("methods.exp_sft.grid.lamm: ExpSFT has no setting 'lamm'; "
                                                     "did you mean lam?")):
        load_study(str(cfg))


@pytest.mark.parametrize("methods, message", [
    ("  exp_sft:\n    grid:\n      lam: [1.0, 0]\n", "methods.exp_sft (lam=0): model.lam must be > 0"),
    ("  sft:\n    overrides: ['--model.init_args.num_negatives=0']\n", "model.num_negatives must be an integer >= 1"),
    ("  dpo:\n    grid:\n      beta: [-1]\n", "methods.dpo (beta=-1): model.beta must be > 0"),
    ("  sft:\n    epochs: 0\n", "sft.epochs must be an integer >= 1"),
])
def test_every_stage_setting_is_checked_before_any_stage_runs(tmp_path, tiny_config, methods, message):
    rm = f"reward_model:\n  config: {ROOT / 'configs/method/reward_model.yaml'}\n" if "dpo" in methods else ""
    cfg = _study(tmp_path, tiny_config, methods)
    cfg.write_text(cfg.read_text() + rm)
    with pytest.raises(RecpostError, match=re.escape(message)):
        experiment(str(cfg), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_stage_lines_come_in_the_order_stages_ran_and_reused_stages_say_so(tmp_path, tiny_config, monkeypatch, capsys):
    monkeypatch.setattr(Runner, "_recpost", _stand_in_cli([]))
    cfg, out = _rlhf_study(tmp_path, tiny_config), tmp_path / "out"
    experiment(str(cfg), output_dir=str(out))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("seed 0")]
    assert [line.split(":")[0] for line in lines[:4]] == [
        "seed 0 base", "seed 0 reward_model", "seed 0 eval_reward_model", "seed 0 base"]  # base fitted first
    assert lines[0].startswith("seed 0 base: fitted val/ndcg@10=") and lines[3].startswith("seed 0 base: ok")
    experiment(str(cfg), output_dir=str(out))
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("seed 0")]
    assert len(again) == 8 and all(": reused (ok " in line for line in again)


def test_an_unreadable_stage_record_means_the_stage_is_run_again(tmp_path, tiny_config, monkeypatch, capsys):
    calls: list[list[str]] = []
    monkeypatch.setattr(Runner, "_recpost", _stand_in_cli(calls))
    cfg, out = _study(tmp_path, tiny_config, "  sft: {}\n"), tmp_path / "out"
    experiment(str(cfg), output_dir=str(out))
    record = out / "seed0" / "sft" / "default" / "stage.json"
    record.write_text(record.read_text()[:40])  # as a crash in the middle of a write would leave it
    calls.clear()
    capsys.readouterr()
    experiment(str(cfg), output_dir=str(out))
    printed = capsys.readouterr().out
    assert f"warning: {record} cannot be read (JSONDecodeError); the stage is run again" in printed
    assert [c[0] for c in calls] == ["fit", "test"] and str(record.parent) in calls[0][-3]  # only that stage
    assert json.loads(record.read_text())["status"] == "ok"


def test_the_output_folder_is_locked_while_an_experiment_runs(tmp_path, tiny_config, monkeypatch):
    from filelock import FileLock, Timeout

    from recpost.experiment.runner import LOCK

    seen = []
    stand_in = _stand_in_cli([])

    def run(self, args, *rest, **kw):
        with pytest.raises(Timeout):  # a second runner could not take the folder now
            FileLock(str(tmp_path / "out" / LOCK)).acquire(timeout=0)
        seen.append(args[0])
        return stand_in(self, args, *rest, **kw)

    monkeypatch.setattr(Runner, "_recpost", run)
    cfg = _study(tmp_path, tiny_config, "  sft: {}\n")
    experiment(str(cfg), output_dir=str(tmp_path / "out"))
    assert seen
    with FileLock(str(tmp_path / "out" / LOCK)):  # held by another experiment: refused before anything runs
        with pytest.raises(RecpostError, match="is in use by another `recpost experiment`"):
            experiment(str(cfg), output_dir=str(tmp_path / "out"))
    FileLock(str(tmp_path / "out" / LOCK)).acquire(timeout=0)  # released when the experiment ended


def _new_training_run(runner, fit_root: Path, before: int) -> int:
    """Wait until the runner's child has started training a new run under ``fit_root``; the child's pid."""
    from tests.helpers import children_of

    deadline = time.time() + 240
    while time.time() < deadline and runner.poll() is None:
        children = children_of(runner.pid)
        if children and len(run_folders(fit_root)) > before:
            return children[0]
        time.sleep(0.2)
    raise AssertionError(f"no training started under {fit_root}: {runner.communicate()}")


@pytest.mark.slow
def test_an_interrupted_experiment_leaves_no_process_behind_and_resumes(tmp_path, tiny_config):
    """SIGINT of the runner stops its child and exits 130; SIGKILL of the runner takes its child with it (a
    parent-death signal); the next run redoes the interrupted stage. (Reusing finished stages: the tests above.)"""
    import signal
    import subprocess
    import sys

    from tests.helpers import is_running, pretrained_checkpoint, recpost, tiny_datamodule

    cfg, out = _study(tmp_path, tiny_config, "  sft:\n    epochs: 5\n"), tmp_path / "out"
    base = pretrained_checkpoint(tiny_datamodule(tmp_path), tmp_path / "base.ckpt")  # no pretraining stage: faster
    cfg.write_text(cfg.read_text() + f"pretrained: {base}\n")
    command = [sys.executable, "-m", "recpost", "experiment", "--config", str(cfg), "--output_dir", str(out)]
    sft_fit = out / "seed0" / "sft" / "default" / "fit"
    for sig in (signal.SIGINT, signal.SIGKILL):
        runner = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        child = _new_training_run(runner, sft_fit, len(run_folders(sft_fit)))
        runner.send_signal(sig)
        stdout, _ = runner.communicate(timeout=120)
        deadline = time.time() + 30
        while is_running(child) and time.time() < deadline:
            time.sleep(0.2)
        assert not is_running(child), f"the training child {child} outlived its runner ({sig.name})"
        assert runner.returncode == (130 if sig == signal.SIGINT else -9)
        if sig == signal.SIGINT:
            assert "seed 0 sft: interrupted (SIGINT); run the same command again to resume" in stdout
    done = recpost("experiment", "--config", str(cfg), "--output_dir", str(out), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seed 0 sft: ok" in done.stdout
    assert [(r["method"], r["status"]) for r in json.loads((out / "results.json").read_text())] == [("sft", "ok")]


def test_figure_axes_are_words_with_units_and_each_method_its_own_x_axis(tmp_path, tiny_config):
    from recpost.experiment.report import Report
    from recpost.experiment.figures import metric_label

    assert metric_label("test/ndcg@10") == "NDCG@10 (test)"
    assert metric_label("val/true_reward@10") == "true reward of the top 10 (stars, validation)"
    plan = build_plan(load_study(str(_rlhf_study(tmp_path, tiny_config))), tmp_path / "out")
    labels = Report(plan).curve_labels
    assert labels["ppo"] == "PPO rollouts (training batches)" and labels["dpo"] == "training batches"


def test_a_command_forked_by_the_launcher_equals_a_fresh_interpreters(tmp_path, tiny_config, monkeypatch):
    """The runner forks its commands from one process that imported recpost once (recpost.experiment.launch):
    the fit's validation metrics, its exit code and a bad command's one error line equal those of a fresh
    ``python -m recpost``; RECPOST_STAGE_LAUNCH=spawn starts fresh interpreters."""
    import csv
    import subprocess

    from recpost.experiment.launch import Forked, StageLauncher

    def fit(launcher: StageLauncher, name: str, *extra: str) -> tuple[object, int, str]:
        log = tmp_path / f"{name}.log"
        args = ["fit", "--config", str(tiny_config), "--seed_everything", "3", "--trainer.max_epochs", "2",
                "--trainer.enable_progress_bar=false", "--trainer.default_root_dir", str(tmp_path / name), *extra]
        with log.open("w") as fh:
            proc = launcher.start(args, log, fh)
            code = proc.wait(timeout=300)
        return proc, code, log.read_text()

    def validations(name: str) -> list[dict[str, str]]:
        with latest_run(tmp_path / name).metrics_csv.open() as fh:
            return [{k: v for k, v in row.items() if k.startswith("val/")} for row in csv.DictReader(fh)
                    if row.get("val/ndcg@10")]

    said: list[str] = []
    forking = StageLauncher(dict(os.environ), lambda: None, said.append)
    try:
        proc, code, _ = fit(forking, "forked")
        assert isinstance(proc, Forked) and code == 0 and not said
        bad, bad_code, bad_log = fit(forking, "bad", "--model.init_args.lr", "-1")
        assert isinstance(bad, Forked) and bad_code == 2 and bad_log.count("error:") == 1
    finally:
        forking.close()
    monkeypatch.setenv("RECPOST_STAGE_LAUNCH", "spawn")
    spawning = StageLauncher(dict(os.environ), lambda: None, said.append)
    proc, code, _ = fit(spawning, "fresh")
    assert isinstance(proc, subprocess.Popen) and code == 0
    assert validations("forked") == validations("fresh") and len(validations("fresh")) == 2
    monkeypatch.setenv("RECPOST_STAGE_LAUNCH", "threads")
    with pytest.raises(RecpostError, match="RECPOST_STAGE_LAUNCH='threads': use fork"):
        StageLauncher(dict(os.environ), lambda: None, said.append)
