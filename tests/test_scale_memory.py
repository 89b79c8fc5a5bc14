"""Memory bounds of what every DDP rank computes from the data (docs/scale/costs.md has the ML-20M figures): the
training mask in one byte per interaction, and a rank of eight building an eighth of the training windows."""

from __future__ import annotations

import tracemalloc
from types import SimpleNamespace

import numpy as np
import torch

from recpost.data import RecDataModule, Table

N_USERS = 20_000


def data_module(tmp_path, **kw) -> RecDataModule:
    """A DataModule over 20,000 users with 3..200 interactions each (~2M), held in memory (no files read)."""
    lengths = np.random.default_rng(0).integers(3, 201, size=N_USERS)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    n = int(offsets[-1])
    dm = RecDataModule(Table(str(tmp_path / "unused.csv")), max_len=50, **kw)
    dm._data = SimpleNamespace(item=np.ones(n, dtype=np.int64), rating=np.ones(n, dtype=np.float32), offsets=offsets,
                               n_users=N_USERS, n_items=1)
    return dm


def peak_bytes(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_training_mask_costs_one_byte_per_interaction_and_holds_out_each_users_last_two(tmp_path):
    dm = data_module(tmp_path)
    in_train, peak = peak_bytes(dm._in_train)
    n = len(dm.data.item)
    assert peak < 1.5 * n  # the bool mask itself; the running-sum version held 16 bytes per interaction
    ends = dm.data.offsets[1:]
    assert not in_train[ends - 1].any() and not in_train[ends - 2].any()
    assert in_train.sum() == n - 2 * N_USERS


def test_item_counts_leave_out_the_held_out_targets_without_copying_the_item_column(tmp_path, monkeypatch):
    monkeypatch.setattr("recpost.data.arrays.COUNT_CHUNK", 1 << 16)  # this small data in chunks too
    dm = data_module(tmp_path)
    dm.data.item = np.random.default_rng(1).integers(1, 51, size=len(dm.data.item))
    dm.data.item.flags.writeable = False  # as the memory-mapped cache's columns are: np.bincount would copy it
    dm.data.n_items = 50
    counts, peak = peak_bytes(dm.train_item_counts)
    assert counts.tolist() == np.bincount(dm.data.item[dm._in_train()], minlength=51).tolist()
    assert peak < 2.5 * len(dm.data.item)  # two masks of a byte each; a copy of the item column is 8 bytes each


def test_a_rank_of_eight_builds_an_eighth_of_the_prefix_windows(tmp_path):
    rank0 = SimpleNamespace(world_size=8, global_rank=0)
    every, per_rank = data_module(tmp_path, train_samples="prefixes", per_rank_windows=False), data_module(
        tmp_path, train_samples="prefixes")
    every.trainer = per_rank.trainer = rank0
    (all_start, _), every_peak = peak_bytes(every.train_windows)
    (own_start, _), own_peak = peak_bytes(per_rank.train_windows)
    assert len(own_start) <= len(all_start) / 8 + 200  # balanced to one user's windows
    assert own_peak < every_peak / 4


def test_asft_scores_its_baseline_a_block_of_states_at_a_time_with_the_same_values(tmp_path, monkeypatch):
    # Without score_chunk_size (the ML-20M study) the baseline held [states, n_items] tensors: 8.3 GB per step there.
    from recpost.methods import ASFT
    from tests.helpers import build, pretrained_checkpoint, reward_model_checkpoint, tiny_datamodule

    dm = tiny_datamodule(tmp_path)
    module = build(ASFT, dm, init_from=str(pretrained_checkpoint(dm, tmp_path / "pre.ckpt")),
                   reward_model=str(reward_model_checkpoint(dm, tmp_path / "rm.ckpt")))
    batch = dm.train_batch(list(range(32)))
    states = batch["next_items"] > 0
    whole = module.baseline(batch, states)
    monkeypatch.setattr("recpost.models.fused_ce.BLOCK_ELEMENTS", 1 << 10)  # 64-row blocks on this tiny catalog
    shapes = []
    score = module.reference.score_columns
    monkeypatch.setattr(module.reference, "score_columns", lambda h, c: shapes.append(h.shape[0]) or score(h, c))
    blocked = module.baseline(batch, states)
    assert int(states.sum()) > 64 and max(shapes) == 64  # never every state at once
    assert torch.allclose(blocked, whole, rtol=1e-5)
