"""Every method under DDP (2 CPU processes, gloo) on HSTU, and SASRec's SFT and reward model (CHAINS):
a fit runs, and evaluation equals one process's exactly.

101 users over 2 ranks: Lightning's sampler pads one shard with a repeated user, which the metrics
must not count twice. The runs form the real chain: SFT from scratch, the reward model from SFT,
then ExpSFT, LinearSFT, A-SFT, PPO, DPO and online DPO from SFT with that reward model, each fitted
with ``--trainer.strategy ddp``, with HSTU; with SASRec SFT and the reward model (the backbone set in the
tiny config).

Every DDP launch pays seconds of imports in each of its processes (Lightning starts the second rank as a
fresh ``python -m`` of the same command), so the whole of it is one launch
(``python -m tests.test_ddp <folder>``, the CLI's own ``run_lightning_cli``): each backbone's DDP fits one
after the other, then its two-process tests. The one-process reference tests are ``recpost test``
commands forked by the tests' launcher (``tests.helpers.recpost``). Test and validation share the
evaluation code; test also writes the per-user rows.
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


PAIRS = [(backbone, method) for backbone, methods in CHAINS.items() for method in methods]


def run_chains(root: Path) -> None:
    """Every backbone's chain under ``root`` (``root/<backbone>``): its methods fitted in turn with 2 DDP
    processes, then each tested with 2 DDP processes (each rank runs this; the process group is kept)."""
    from recpost.cli.main import run_lightning_cli

    for backbone, methods in CHAINS.items():
        folder = root / backbone
        for method in methods:
            run_lightning_cli(["fit", *method_args(folder, method), *DDP,
                               "--trainer.default_root_dir", str(folder / method)])
        for method in methods:
            run_lightning_cli(["test", *eval_args(folder, method), *DDP,
                               "--trainer.default_root_dir", str(eval_root(folder, method, 2))])


@pytest.fixture(scope="module")
def ddp_chains(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The folder where every chain was fitted under DDP and tested in two processes and in one (the tiny
    config with each backbone of CHAINS, in ``<folder>/<backbone>``), and the DDP launch's output."""
    from tests.helpers import recpost, write_tiny_config

    root = tmp_path_factory.mktemp("ddp")
    for backbone in CHAINS:
        (root / backbone).mkdir()
        config = write_tiny_config(root / backbone, max_epochs=1)
        config.write_text(config.read_text().replace("    backbone:\n", f"    backbone:\n      name: {backbone}\n"))
    out = subprocess.run([sys.executable, "-m", "tests.test_ddp", str(root)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"the DDP chains failed:\n{out.stderr[-3000:]}"
    for backbone, method in PAIRS:
        folder = root / backbone
        one = recpost("test", *eval_args(folder, method), "--trainer.devices", "1",
                      "--trainer.default_root_dir", str(eval_root(folder, method, 1)), cwd=ROOT)
        assert one.returncode == 0, f"{backbone} {method}, one process:\n{one.stderr[-3000:]}"
    return root, out


@pytest.mark.slow
def test_the_fits_ran_on_two_ranks(ddp_chains):
    _, out = ddp_chains
    assert "MEMBER: 2/2" in out.stderr  # Lightning's line of the second rank joining


@pytest.mark.slow
@pytest.mark.parametrize("backbone,method", PAIRS)
def test_fit_under_ddp_keeps_a_checkpoint_and_logs_validation(ddp_chains, backbone, method):
    folder = ddp_chains[0] / backbone
    run = latest_run(folder / method)
    assert run.best_checkpoint.is_file()
    header = run.metrics_csv.read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/ndcg@10"} <= set(header)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,method", PAIRS)
def test_two_process_test_metrics_and_per_user_rows_equal_one_process(ddp_chains, backbone, method):
    # the per-user rows feed the experiment's paired bootstrap: they must be every user's, once
    folder = ddp_chains[0] / backbone
    one, two = (latest_run(eval_root(folder, method, n)) for n in (1, 2))
    metrics = json.loads(one.metrics_json("test").read_text())
    assert metrics["test/n_users"] == 101
    assert {"test/ndcg@10", "test/coverage@10", *(m.replace("val/", "test/") for m in EXPECTED[method])} <= set(metrics)
    assert two.metrics_json("test").read_text() == one.metrics_json("test").read_text()
    assert two.per_user_csv.read_text() == one.per_user_csv.read_text()
    assert len(one.per_user_csv.read_text().splitlines()) == 1 + 101


if __name__ == "__main__":  # launched by the ddp_chains fixture (and, for rank 1, by Lightning)
    run_chains(Path(sys.argv[1]))
