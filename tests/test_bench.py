"""``recpost bench``'s pieces: the large-catalog settings, the FLOP count, and a clear refusal without a GPU."""

from __future__ import annotations

import pytest
import torch

from recpost.bench import bench, sft_step_flops
from recpost.bench.steps import LARGE_CATALOG, method_settings
from recpost.core.errors import RecpostError
from recpost.models import BackboneConfig


def test_large_catalogs_switch_every_method_to_its_bounded_memory_path():
    assert method_settings("ppo", LARGE_CATALOG - 1) == {} and method_settings("dpo", 1_000) == {}
    big = LARGE_CATALOG
    assert method_settings("sft", big)["softmax"] == "sampled"
    assert method_settings("exp_sft", big)["softmax"] == "sampled"
    assert method_settings("ppo", big)["kl_estimator"] == "k3" and method_settings("ppo", big)["score_chunk_size"]
    assert method_settings("dpo", big)["score_chunk_size"]


def test_useful_flops_leave_out_the_padding():
    batch = {"input_items": torch.tensor([[0, 0, 1, 2], [3, 4, 5, 6]]), "next_items": torch.tensor([[0, 0, 2, 7], [4, 5, 6, 7]])}
    cfg = BackboneConfig(d_model=8, n_layers=1, ff_mult=4)
    full, useful = sft_step_flops(batch, cfg, 10), sft_step_flops(batch, cfg, 10, useful=True)
    # dense work on 8 positions vs 6 real ones, attention 2 x 16 vs 4 + 16, the same 6 targets' logits
    logits = 2 * 6 * 8 * 11
    assert full == 3 * ((2 * 8 * 12 * 64 + 4 * 32 * 8) + logits)
    assert useful == 3 * ((2 * 6 * 12 * 64 + 4 * 20 * 8) + logits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --device cuda is valid here")
def test_device_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(RecpostError, match="--device cuda: no CUDA device"):
        bench(device="cuda")


def test_the_epoch_timer_takes_the_validation_inside_the_epoch_out(monkeypatch):
    # Lightning validates between an epoch's last batch and on_train_epoch_end: the training figure must
    # not count it, the with-validation figure must.
    from types import SimpleNamespace

    from recpost.bench import steps

    clock = iter([0.0, 7.0, 9.5, 10.0])  # epoch start, validation start, validation end, epoch end
    monkeypatch.setattr(steps.time, "perf_counter", lambda: next(clock))
    timer, trainer = steps.Timer(), SimpleNamespace(sanity_checking=False)
    timer.on_train_epoch_start(trainer, None)
    timer.on_validation_epoch_start(trainer, None)
    timer.on_validation_epoch_end(trainer, None)
    timer.on_train_epoch_end(trainer, None)
    assert (timer.train, timer.with_val, timer.val) == ([7.5], [10.0], [2.5])


def test_every_method_the_project_trains_gets_a_timed_step_with_its_shipped_pairs(tmp_path):
    from recpost.bench.steps import METHODS, method_steps
    from tests.helpers import TINY_BACKBONE, tiny_datamodule

    assert {"linear_sft", "asft", "online_dpo", "rs_dpo"} <= set(METHODS)
    dm = tiny_datamodule(tmp_path)
    dm.setup("fit")
    common = dict(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=dm.max_len, backbone=TINY_BACKBONE)
    steps = method_steps(dm, common, "cpu")
    assert list(steps) == list(METHODS)
    assert steps["online_dpo"].module.hparams.pair_policy == "current"
    assert steps["rs_dpo"].module.hparams.pair_policy == "reference" and len(steps["rs_dpo"].module.hparams.reward_ensemble) == 2
    batch = next(iter(dm.train_dataloader()))
    for name, step in steps.items():
        assert step(batch, 0) > 0, name
