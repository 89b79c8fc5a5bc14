"""W&B sweep files: valid for W&B's open-source sweep engine, and a generated command runs end to end.

No W&B server is reachable here, so the agent's two jobs are done with W&B's own code: the ``sweeps``
package proposes the next run's parameters, and ``wandb``'s ``create_sweep_command_args`` turns them
into the ``${args}`` flags, exactly as ``wandb agent`` would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.helpers import latest_run, recpost

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pydantic v1-style config keys inside the sweeps package
    sweeps = pytest.importorskip("sweeps", reason="W&B's sweep engine (pip install sweeps) is a dev dependency")


def test_both_sweep_files_exist():
    assert {p.name for p in SWEEPS} >= {"exp_sft_lambda.yaml", "exp_sft_lambda_bayes.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_is_valid_and_proposes_a_lambda(path):
    config = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(config) == []
    assert config["metric"] == {"name": "val/ndcg@10", "goal": "maximize"}
    run = sweeps.next_run(config, [], validate=True)
    lam = run.config["model.init_args.lam"]["value"]
    assert 0.1 <= lam <= 10.0
    # every config file the command names exists in the repository
    command = config["command"]
    for flag, value in zip(command, command[1:]):
        if flag == "--config":
            assert (ROOT / value).is_file(), value


def _agent_command(config: dict, run_config: dict, env: dict[str, str]) -> list[str]:
    """What ``wandb agent`` executes: the macros of ``command`` filled in."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    flags = create_sweep_command_args({"args": run_config})["args"]
    out: list[str] = []
    for chunk in config["command"]:
        if chunk == "${env}":
            continue
        if chunk == "${args}":
            out += flags
            continue
        out.append(re.sub(r"\$\{envvar:([A-Z0-9_]*)\}", lambda m: env[m.group(1)], chunk))
    return out


@pytest.mark.slow
def test_a_generated_grid_command_trains_and_logs_to_wandb_and_csv(tiny_config, tmp_path):
    pre = recpost("fit", "--config", str(tiny_config), "--trainer.max_epochs", "1")
    assert pre.returncode == 0, pre.stderr[-2000:]
    ckpt = latest_run(tiny_config.parent / "runs").best_checkpoint
    config = yaml.safe_load((ROOT / "sweeps" / "exp_sft_lambda.yaml").read_text())
    run = sweeps.next_run(config, [], validate=True)
    command = _agent_command(config, run.config, {"RECPOST_INIT_FROM": str(ckpt)})
    assert command[:2] == ["recpost", "fit"]
    # the tiny data stands in for MovieLens; everything else is the sweep's command as generated
    args = [str(tiny_config) if a == "configs/pretrain/ml100k.yaml" else a for a in command[2:]]
    root = tmp_path / "sweep-run"
    out = subprocess.run([sys.executable, "-m", "recpost", "fit", *args, "--trainer.max_epochs=1",
                          f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = latest_run(root)
    saved = yaml.safe_load(run_dir.config.read_text())
    assert saved["model"]["init_args"]["lam"] == run.config["model.init_args.lam"]["value"]
    assert "val/ndcg@10" in run_dir.metrics_csv.read_text().splitlines()[0]  # CSV logs always written
    assert run_dir.best_checkpoint.is_file()
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
