"""Multi-node DDP as a cluster runs it: two `torchrun --nnodes 2` launches (one per "node", here both on
loopback with gloo), each running the real `recpost fit` with configs/trainer/multinode.yaml."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from recpost.core.runs import run_folders

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


class FinalWeightsReport(L.Callback):
    """Writes each rank's view of the run and a hash of its final weights to ``<out_dir>/rank<R>.json``.

    Loaded by the `recpost fit` processes from this module (class_path in a config file).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
            "weights_sha256": weights_hash(pl_module.state_dict()),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """Order-independent fingerprint of every tensor's name, dtype, shape and exact values."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_nodes(fit_args: list[str], logs: Path) -> list[int]:
    """Starts `torchrun --node-rank 0` and `--node-rank 1`; returns both exit codes.

    If one node fails the other would wait for its peer until the rendezvous times out, so it is
    stopped at once; both are stopped after TIMEOUT_S.
    """
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "recpost", *fit_args]
        log = (logs / f"node{node_rank}.log").open("w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        log.close()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # torchrun and its worker: the group this test started
                p.wait()
    return [p.returncode for p in procs]


@pytest.mark.slow
def test_two_torchrun_nodes_train_one_model_and_write_one_checkpoint(tiny_config, tmp_path):
    reports = tmp_path / "reports"
    extra = tmp_path / "report_callback.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n"
        f"    - class_path: tests.test_multinode.FinalWeightsReport\n      init_args:\n        out_dir: {reports}\n"
    )
    fit_args = ["fit", "--config", str(tiny_config), "--config", "configs/trainer/multinode.yaml",
                "--config", str(extra),
                # the preset targets GPUs; here each "node" is one CPU process
                "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
                "--trainer.max_epochs", "1"]

    codes = _launch_two_nodes(fit_args, tmp_path)

    logs = {n: (tmp_path / f"node{n}.log").read_text() for n in (0, 1)}
    assert codes == [0, 0], f"exit codes {codes}\nnode 0:\n{logs[0][-3000:]}\nnode 1:\n{logs[1][-3000:]}"

    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["global_rank"], r["node_rank"]) for r in ranks] == [(0, 0), (1, 1)]
    assert all(r["world_size"] == 2 and r["num_nodes"] == 2 for r in ranks)
    assert all(r["cluster_environment"] == "TorchElasticEnvironment" for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"], "the two nodes ended with different weights"

    runs = tmp_path / "runs"
    versions = run_folders(runs)
    assert [v.version for v in versions] == [0]
    ckpts = sorted(runs.rglob("*.ckpt"))
    assert ckpts == sorted([versions[0].best_checkpoint, versions[0].last_checkpoint])  # each written once
    # One epoch: the checkpoints hold the weights both ranks finished with.
    for ckpt in ckpts:
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert weights_hash(state) == ranks[0]["weights_sha256"], ckpt.name

    # Evaluation over both nodes counted every one of the 101 users exactly once.
    header, *rows = versions[0].metrics_csv.read_text().splitlines()
    column = header.split(",").index("val/n_users")
    assert [float(row.split(",")[column]) for row in rows if row.split(",")[column]] == [101.0]
