"""Every method under DDP (2 CPU processes, gloo): a fit runs, and evaluation equals one process's exactly.

101 users over 2 ranks: Lightning's sampler pads one shard with a repeated user, which the metrics
must not count twice. The runs form the real chain: SFT from scratch, the reward model from SFT,
then ExpSFT, PPO and DPO from SFT with that reward model, each fitted with ``--trainer.strategy ddp``.

Every launch pays seconds of imports per process, so the five fits run one after the other in a
single DDP launch, and the five one-process reference validations in a single process (``python -m
tests.test_ddp fit|validate <folder>``, the CLI's own ``run_lightning_cli``); each two-process
validation is a real ``recpost validate`` launch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recpost.runs import LOGS_DIR, RunFolder
from tests.helpers import latest_run, recpost

ROOT = Path(__file__).resolve().parents[1]
METHOD_CONFIGS = ROOT / "configs" / "method"
DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
# Fitted in this order (each may start from the ones before), with the validation metrics each must
# have besides the ranking metrics (all compared across process counts).
EXPECTED = {
    "sft": ("val/eval_rm_reward@10",),
    "reward_model": ("val/rmse", "val/mae", "val/rmse_global_mean", "val/rmse_item_mean", "val/rmse_user_mean"),
    "exp_sft": ("val/eval_rm_reward@10",),
    "ppo": ("val/rm_reward@10",),
    "dpo": ("val/rm_reward@10",),
}


def best_checkpoint(folder: Path, method: str) -> Path:
    return RunFolder(folder / method / LOGS_DIR / "version_0").best_checkpoint


def method_args(folder: Path, method: str) -> list[str]:
    """The config arguments of ``method`` in the chain under ``folder`` (the tiny config, then its method's)."""
    args = ["--config", str(folder / "tiny.yaml")]
    if method != "sft":
        args += ["--config", str(METHOD_CONFIGS / f"{method}.yaml"),
                 "--model.init_args.init_from", str(best_checkpoint(folder, "sft"))]
    if method in ("ppo", "dpo"):
        args += ["--model.init_args.reward_model", str(best_checkpoint(folder, "reward_model"))]
    return args


def validate_args(folder: Path, method: str) -> list[str]:
    """``method_args`` plus its best checkpoint (and a reward model to evaluate with, for SFT and ExpSFT)."""
    args = [*method_args(folder, method), "--ckpt_path", str(best_checkpoint(folder, method))]
    if method in ("sft", "exp_sft"):
        args += ["--model.init_args.eval_reward_model", str(best_checkpoint(folder, "reward_model"))]
    return args


def one_process_root(folder: Path, method: str) -> Path:
    return folder / f"{method}-validate-1"


def run_chain(stage: str, folder: Path) -> None:
    """``fit``: every method in turn with 2 DDP processes (each rank runs this; the process group is kept).
    ``validate``: every fitted method in one process, into ``one_process_root``."""
    from recpost.cli import run_lightning_cli

    for method in EXPECTED:
        if stage == "fit":
            run_lightning_cli(["fit", *method_args(folder, method), *DDP,
                               "--trainer.default_root_dir", str(folder / method)])
        else:
            run_lightning_cli(["validate", *validate_args(folder, method), "--trainer.devices", "1",
                               "--trainer.default_root_dir", str(one_process_root(folder, method))])


@pytest.fixture(scope="module")
def ddp_chain(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The folder where every method was fitted under DDP and validated in one process, and the fits' output."""
    from tests.helpers import write_tiny_config

    folder = tmp_path_factory.mktemp("ddp")
    write_tiny_config(folder, max_epochs=1)
    outputs = {}
    for stage in ("fit", "validate"):
        outputs[stage] = subprocess.run([sys.executable, "-m", "tests.test_ddp", stage, str(folder)], cwd=ROOT,
                                        capture_output=True, text=True, timeout=600)
        assert outputs[stage].returncode == 0, f"{stage} chain failed:\n{outputs[stage].stderr[-3000:]}"
    return folder, outputs["fit"]


@pytest.mark.slow
def test_the_fits_ran_on_two_ranks(ddp_chain):
    _, out = ddp_chain
    assert "MEMBER: 2/2" in out.stderr  # Lightning's line of the second rank joining


@pytest.mark.slow
@pytest.mark.parametrize("method", list(EXPECTED))
def test_fit_under_ddp_keeps_a_checkpoint_and_logs_validation(ddp_chain, method):
    folder, _ = ddp_chain
    run = latest_run(folder / method)
    assert run.best_checkpoint.is_file()
    header = run.metrics_csv.read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/ndcg@10"} <= set(header)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(EXPECTED))
def test_two_process_validation_metrics_equal_one_process(ddp_chain, method, tmp_path):
    folder, _ = ddp_chain
    one = json.loads(latest_run(one_process_root(folder, method)).metrics_json("val").read_text())
    out = recpost("validate", *validate_args(folder, method), *DDP, "--trainer.default_root_dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(latest_run(tmp_path).metrics_json("val").read_text())
    assert one["val/n_users"] == 101
    assert {"val/ndcg@10", "val/coverage@10", *EXPECTED[method]} <= set(one)
    assert two == one


@pytest.mark.slow
def test_two_process_test_metrics_and_per_user_rows_equal_one_process(ddp_chain, tmp_path):
    # the per-user rows feed the experiment's paired bootstrap: they must be every user's, once
    folder, _ = ddp_chain
    outputs = {}
    for devices, extra in ((1, ()), (2, DDP[2:])):
        root = tmp_path / f"test-{devices}"
        out = recpost("test", *validate_args(folder, "exp_sft"), "--trainer.devices", str(devices), *extra,
                      "--trainer.default_root_dir", str(root))
        assert out.returncode == 0, out.stderr[-3000:]
        run = latest_run(root)
        outputs[devices] = (run.metrics_json("test").read_text(), run.per_user_csv.read_text())
    assert outputs[2] == outputs[1]
    rows = outputs[1][1].splitlines()
    assert len(rows) == 1 + 101 and "eval_rm_reward@10" in rows[0]


if __name__ == "__main__":  # launched by the ddp_chain fixture (and, for rank 1 of the fits, by Lightning)
    run_chain(sys.argv[1], Path(sys.argv[2]))
