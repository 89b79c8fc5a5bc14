"""Evaluation under DDP (2 CPU processes, gloo) equals single-process evaluation exactly."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import _run_dir, recpost


@pytest.mark.slow
def test_two_process_validation_metrics_equal_one_process(tiny_config):
    # 101 users over 2 ranks: Lightning's sampler pads one shard with a repeated user.
    fit = recpost("fit", "--config", str(tiny_config), "--trainer.max_epochs", "1")
    assert fit.returncode == 0, fit.stderr[-3000:]
    runs = tiny_config.parent / "runs"
    ckpt = _run_dir(runs) / "checkpoints" / "best.ckpt"

    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        out = recpost("validate", "--config", str(tiny_config), "--ckpt_path", str(ckpt),
                      "--trainer.devices", str(devices), "--trainer.strategy", strategy)
        assert out.returncode == 0, out.stderr[-3000:]
        results[devices] = json.loads((_run_dir(runs) / "val_metrics.json").read_text())
    assert results[1]["val/n_users"] == 101
    assert results[2] == results[1]
