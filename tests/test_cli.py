"""The real `recpost` entry point: fit -> best checkpoint -> test -> test_metrics.json; what it prints;
settings given with --ckpt_path; resuming a fit exactly."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from recpost.cli.main import overview, run_lightning_cli
from recpost.core.errors import RecpostError
from recpost.core.runs import run_folders
from tests.helpers import (
    latest_run,
    metrics_rows,
    pretrained_checkpoint,
    recpost,
    recpost_cases,
    reward_model_checkpoint,
    tiny_datamodule,
    write_tiny_interactions,
)

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["ndcg@10", "ndcg@50", "hr@10", "hr@50", "mrr", "ndcg@10_liked", "hr@10_liked", "rating@10", "coverage@10"]
# Lightning's messages that say nothing to a recpost user (recpost.cli.console filters them).
NOISE = ("litlogger", "LeafSpec", "dirpath has changed", "`srun` command")


@pytest.fixture
def fitted(tiny_config: Path) -> tuple[Path, Path]:
    out = recpost("fit", "--config", str(tiny_config))
    assert out.returncode == 0, out.stderr[-3000:]
    run = latest_run(tiny_config.parent / "runs")
    assert not any(noise in out.stdout + out.stderr for noise in NOISE), out.stdout + out.stderr
    assert out.stderr.strip() == ""  # warnings and errors only, and there are none
    assert re.search(rf"best checkpoint \(val/ndcg@10 = 0\.\d{{4}}\): {re.escape(str(run.best_checkpoint))}", out.stdout)
    return tiny_config, run


@pytest.mark.slow
def test_fit_keeps_the_best_validation_checkpoint_and_logs_metrics(fitted):
    _, run = fitted
    assert (run.best_checkpoint).is_file()
    assert run.last_checkpoint.is_file()  # the resume point
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
    assert not any(noise in out.stdout + out.stderr for noise in NOISE)
    path = latest_run(run.path, "test").metrics_json("test")  # next to the run: <run>/test/version_0
    assert path.parent == run.evaluations("test") / "version_0"
    assert [r.path for r in run_folders(cfg.parent / "runs")] == [run.path]  # no new run
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
    lines = latest_run(run.path, "predict").predictions_csv.read_text().splitlines()
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


def test_help_lists_every_command_with_one_line(capsys):
    from recpost.cli.main import FUNCTION_COMMANDS, LIGHTNING_COMMANDS, OWN_PARSER_COMMANDS, main

    with pytest.raises(SystemExit) as exit_code:
        main(["--help"])
    printed = capsys.readouterr().out
    assert exit_code.value.code == 0 and printed.strip() == overview()
    listed = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  ")}
    assert set(listed) == {*LIGHTNING_COMMANDS, *FUNCTION_COMMANDS, *OWN_PARSER_COMMANDS} >= {
        "fit", "test", "experiment", "bench", "configs", "report"}
    assert all(len(line.split()) > 2 for line in listed.values())  # each says what it does


# ----------------------------------------------------------------------------------- settings with --ckpt_path
@pytest.fixture
def policy(tiny_config: Path, monkeypatch) -> tuple[Path, Path, Path]:
    """(tiny config, a policy checkpoint, a reward-model checkpoint) of the tiny data; the tests run the CLI
    in this process, with its arguments given as a list (pytest's own are out of sys.argv)."""
    monkeypatch.setattr(sys, "argv", ["recpost"])
    dm = tiny_datamodule(tiny_config.parent)
    return (tiny_config, pretrained_checkpoint(dm, tiny_config.parent / "policy.ckpt"),
            reward_model_checkpoint(dm, tiny_config.parent / "rm.ckpt"))


@pytest.mark.parametrize("setting, value, expected", [
    ("mask_history", "false", False),
    ("score_chunk_size", "7", 7),
    ("eval_reward_model", "RM", "RM"),
])
def test_an_evaluation_setting_given_with_ckpt_path_wins_over_the_checkpoint(policy, setting, value, expected):
    cfg, ckpt, rm = policy
    value, expected = (str(rm), str(rm)) if value == "RM" else (value, expected)
    cli = run_lightning_cli(["test", "--config", str(cfg), "--ckpt_path", str(ckpt), f"--model.init_args.{setting}",
                             value, "--trainer.default_root_dir", str(cfg.parent / "eval")])
    assert cli.model.hparams[setting] == expected
    config = yaml.safe_load(latest_run(cfg.parent / "eval").config.read_text())
    assert config["model"]["init_args"][setting] == expected  # config.yaml records what was used
    if setting == "eval_reward_model":
        assert "test/eval_rm_reward@10" in cli.trainer.callback_metrics


def test_an_evaluation_setting_from_a_config_file_wins_over_the_checkpoint(policy):
    cfg, ckpt, _ = policy
    unmasked = cfg.parent / "unmasked.yaml"
    unmasked.write_text("model:\n  init_args:\n    mask_history: false\n")
    cli = run_lightning_cli(["test", "--config", str(cfg), "--config", str(unmasked), "--ckpt_path", str(ckpt)])
    assert cli.model.hparams.mask_history is False


@pytest.mark.parametrize("flag, value", [
    ("lr", "0.5"), ("weight_decay", "0.1"), ("warmup_steps", "5"), ("lr_schedule", "cosine"), ("softmax", "sampled"),
    ("num_negatives", "8"), ("init_from", "other.ckpt"), ("backbone.d_model", "32"),
])
def test_a_training_setting_given_with_ckpt_path_that_differs_from_the_checkpoint_is_refused(policy, flag, value):
    cfg, ckpt, _ = policy
    with pytest.raises(RecpostError, match=rf"model\.init_args\.{re.escape(flag)}: .* differs from the checkpoint's"):
        run_lightning_cli(["test", "--config", str(cfg), "--ckpt_path", str(ckpt), f"--model.init_args.{flag}", value])


def test_a_training_setting_equal_to_the_checkpoints_is_accepted(policy):
    cfg, ckpt, _ = policy  # the experiment runner tests with its fit's flags
    cli = run_lightning_cli(["test", "--config", str(cfg), "--ckpt_path", str(ckpt), "--model.init_args.lr", "0.001",
                             "--trainer.default_root_dir", str(cfg.parent / "eval")])
    assert cli.model.hparams.lr == 0.001


# ----------------------------------------------------------------------------------- resuming a fit
@pytest.mark.slow
def test_a_fit_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(tiny_config):
    """Killed (SIGKILL) in the middle of epoch 1 of 2, then `--ckpt_path last`: every logged row and every
    weight equal those of a fit that was never stopped."""
    kill = tiny_config.parent / "kill.yaml"
    kill.write_text("trainer:\n  callbacks:\n    - class_path: tests.helpers.KillAfterBatches\n"
                    "      init_args: {batches: 7}\n")  # 5 batches per epoch: in the middle of the second one
    whole, stopped = tiny_config.parent / "whole", tiny_config.parent / "stopped"
    fit = ["fit", "--config", str(tiny_config)]
    done = recpost_cases({
        "whole": ([*fit, "--trainer.default_root_dir", str(whole)], {}),
        "killed": ([*fit, "--config", str(kill), "--trainer.default_root_dir", str(stopped)], {}),
        "resumed": ([*fit, "--trainer.default_root_dir", str(stopped), "--ckpt_path", "last"], {}),
    }, cwd=ROOT)
    assert done["whole"].returncode == 0 and done["killed"].returncode == -9, done["killed"].stderr[-2000:]
    assert done["resumed"].returncode == 0, done["resumed"].stderr[-3000:]
    assert done["resumed"].stderr.strip() == ""
    a, b = latest_run(whole), latest_run(stopped)
    assert b.version == 0 and len(run_folders(stopped)) == 1  # continued in its own folder
    def logged(run):  # every logged value but the wall time, which no two runs share
        return [{k: v for k, v in row.items() if k != "time/elapsed_seconds"} for row in metrics_rows(run)]

    assert logged(a) == logged(b)
    for name in ("best", "last"):
        mine = torch.load(b.checkpoints / f"{name}.ckpt", weights_only=True)["state_dict"]
        theirs = torch.load(a.checkpoints / f"{name}.ckpt", weights_only=True)["state_dict"]
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_config_headers_name_real_paths(path):
    roots = {(yaml.safe_load(p.read_text()).get("trainer") or {}).get("default_root_dir")
             for p in (ROOT / "configs" / "pretrain").glob("*.yaml")}
    header = "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
    for config in re.findall(r"configs/[\w/.-]+\.yaml", header):
        assert (ROOT / config).is_file(), config
    own = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("default_root_dir")
    for root in re.findall(r"(runs/[\w.-]+)/lightning_logs", header):
        assert root == own if own else root in roots, root
