"""bf16-mixed on CPU: scores, losses and weights stay fp32; a real fit runs."""

from __future__ import annotations

import torch
import pytest

from recpost.data import RecDataModule, Table
from recpost.methods import ExpSFT
from recpost.models import BackboneConfig
from tests.conftest import write_tiny_interactions
from tests.test_cli import _run_dir, recpost


def test_scores_and_exp_sft_loss_are_fp32_under_cpu_autocast(tmp_path):
    dm = RecDataModule(Table(str(write_tiny_interactions(tmp_path / "t.csv")), name="t"), max_len=8,
                       cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(0)
    m = ExpSFT(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=8, lam=1e-3,
               backbone=BackboneConfig(d_model=16, n_layers=1, n_heads=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = m.training_loss(dm._collate_train(list(range(16))))
        scores = m.catalog_scores(dm._collate_eval(list(range(4)), "val"))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert scores.dtype == torch.float32
    # fp32 scores keep distinct values (bf16 would collapse many of them)
    finite = scores[torch.isfinite(scores)]
    assert finite.unique().numel() == finite.numel()


@pytest.mark.slow
def test_bf16_mixed_fit_runs_and_logs_finite_metrics(tiny_config):
    out = recpost("fit", "--config", str(tiny_config), "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    header, *rows = (_run_dir(tiny_config.parent / "runs") / "metrics.csv").read_text().splitlines()
    col = header.split(",").index("val/ndcg@10")
    values = [float(r.split(",")[col]) for r in rows if r.split(",")[col]]
    assert values and all(0.0 <= v <= 1.0 for v in values)
