"""Every method under DDP (2 CPU processes, gloo) on HSTU, and SASRec's SFT and reward model (CHAINS):
a fit runs, and evaluation equals one process's exactly.

101 users over 2 ranks: Lightning's sampler pads one shard with a repeated user, which the metrics
must not count twice. The runs form the real chain: SFT from scratch, the reward model from SFT,
then ExpSFT, LinearSFT, A-SFT, PPO, DPO and online DPO from SFT with that reward model, each fitted
with ``--trainer.strategy ddp``, with HSTU; with SASRec SFT and the reward model (the backbone set in the
tiny config).

Every launch pays seconds of imports per process, so each stage of the chain runs as one launch
(``python -m tests.test_ddp fit|test1|test2 <folder>``, the CLI's own ``run_lightning_cli``): the
DDP fits one after the other, the one-process reference tests, and the two-process tests in one DDP
launch. Test and validation share the evaluation code; test also writes the per-user rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recpost.core.runs import LOGS_DIR, RunFolder
from tests.helpers import latest_run

ROOT = Path(__file__).resolve().parents[1]
METHOD_CONFIGS = ROOT / "configs" / "method"
DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
# Fitted in this order (each may start from the ones before), with the validation metrics each must
# have besides the ranking metrics (all compared across process counts).
EXPECTED = {
    "sft": ("val/eval_rm_reward@10",),
    "reward_model": ("val/rmse", "val/mae", "val/rmse_global_mean", "val/rmse_item_mean", "val/rmse_user_mean"),
    "exp_sft": ("val/eval_rm_reward@10",),
    "linear_sft": (),
    "asft": ("val/rm_reward@10",),  # its weights' batch mean is gathered over the ranks
    "ppo": ("val/rm_reward@10",),
    "dpo": ("val/rm_reward@10",),
    "online_dpo": ("val/rm_reward@10",),  # DPO on pairs each rank samples from its current policy
}


def best_checkpoint(folder: Path, method: str) -> Path:
    return RunFolder(folder / method / LOGS_DIR / "version_0").best_checkpoint


def method_args(folder: Path, method: str) -> list[str]:
    """The config arguments of ``method`` in the chain under ``folder`` (the tiny config, then its method's)."""
    args = ["--config", str(folder / "tiny.yaml")]
    if method != "sft":
        args += ["--config", str(METHOD_CONFIGS / f"{method}.yaml"),
                 "--model.init_args.init_from", str(best_checkpoint(folder, "sft"))]
    if method in ("ppo", "dpo", "online_dpo", "asft"):
        args += ["--model.init_args.reward_model", str(best_checkpoint(folder, "reward_model"))]
    return args


def eval_args(folder: Path, method: str) -> list[str]:
    """``method_args`` plus its best checkpoint (and a reward model to evaluate with, for SFT and ExpSFT)."""
    args = [*method_args(folder, method), "--ckpt_path", str(best_checkpoint(folder, method))]
    if method in ("sft", "exp_sft"):
        args += ["--model.init_args.eval_reward_model", str(best_checkpoint(folder, "reward_model"))]
    return args


def eval_root(folder: Path, method: str, processes: int) -> Path:
    return folder / f"{method}-test-{processes}"


# The backbone only changes ``encode``: what DDP changes (gathered batch statistics, rollouts and pairs per
# rank, the exact evaluation over padded shards) is the methods'. So every method runs on HSTU, the paper's
# backbone, and SASRec runs the chain's first two fits (next-item from scratch, the reward model), which its
# evaluation needs: 6 fewer DDP fits and tests (~100 s of a 2-core suite).
CHAINS = {"hstu": list(EXPECTED), "sasrec": ["sft", "reward_model"]}


def chain_methods(folder: Path) -> list[str]:
    """The methods of the chain in ``folder`` (its backbone's, written by the fixture)."""
    return CHAINS[(folder / "backbone").read_text().strip()]


def run_chain(stage: str, folder: Path) -> None:
    """``fit``: every method of the chain in turn with 2 DDP processes (each rank runs this; the process group
    is kept). ``test1`` / ``test2``: every fitted method tested in one process / in two DDP processes."""
    from recpost.cli.main import run_lightning_cli

    for method in chain_methods(folder):
        if stage == "fit":
            run_lightning_cli(["fit", *method_args(folder, method), *DDP,
                               "--trainer.default_root_dir", str(folder / method)])
        else:
            processes, devices = (1, ("--trainer.devices", "1")) if stage == "test1" else (2, DDP)
            run_lightning_cli(["test", *eval_args(folder, method), *devices,
                               "--trainer.default_root_dir", str(eval_root(folder, method, processes))])


@pytest.fixture(scope="module", params=["sasrec", "hstu"])
def ddp_chain(tmp_path_factory, request) -> tuple[Path, subprocess.CompletedProcess]:
    """The folder where every method was fitted under DDP and tested in one and in two processes (the
    tiny config with ``request.param`` as its backbone), and the fits' output."""
    from tests.helpers import write_tiny_config

    folder = tmp_path_factory.mktemp(f"ddp-{request.param}")
    config = write_tiny_config(folder, max_epochs=1)
    config.write_text(config.read_text().replace("    backbone:\n", f"    backbone:\n      name: {request.param}\n"))
    (folder / "backbone").write_text(request.param)
    outputs = {}
    for stage in ("fit", "test1", "test2"):
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
    if method not in chain_methods(folder):
        pytest.skip(f"{method} runs under DDP on HSTU only (CHAINS)")
    run = latest_run(folder / method)
    assert run.best_checkpoint.is_file()
    header = run.metrics_csv.read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/ndcg@10"} <= set(header)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(EXPECTED))
def test_two_process_test_metrics_and_per_user_rows_equal_one_process(ddp_chain, method):
    # the per-user rows feed the experiment's paired bootstrap: they must be every user's, once
    folder, _ = ddp_chain
    if method not in chain_methods(folder):
        pytest.skip(f"{method} runs under DDP on HSTU only (CHAINS)")
    one, two = (latest_run(eval_root(folder, method, n)) for n in (1, 2))
    metrics = json.loads(one.metrics_json("test").read_text())
    assert metrics["test/n_users"] == 101
    assert {"test/ndcg@10", "test/coverage@10", *(m.replace("val/", "test/") for m in EXPECTED[method])} <= set(metrics)
    assert two.metrics_json("test").read_text() == one.metrics_json("test").read_text()
    assert two.per_user_csv.read_text() == one.per_user_csv.read_text()
    assert len(one.per_user_csv.read_text().splitlines()) == 1 + 101


if __name__ == "__main__":  # launched by the ddp_chain fixture (and, for rank 1 of the fits, by Lightning)
    run_chain(sys.argv[1], Path(sys.argv[2]))
