"""Each DDP rank materialises only its share of the training windows (``RecDataModule(per_rank_windows=True)``,
``recpost/data/shards.py``): the ranks' windows are disjoint, their union is the one-process set, every rank runs
the same number of batches, and the metrics equal one process's.

The two-process test is one launch of two gloo processes (``python -m tests.test_scale_ddp <folder>``, Lightning's
``ddp`` strategy on CPU, as tests/test_ddp.py runs it): an SFT epoch on the tiny data, each rank recording the
windows it built and the ones its batches used; then, in this process, one-process validation of the weights
the two ranks ended with, compared with the validation the two ranks computed together.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from recpost.data import RecDataModule, Table
from recpost.data.sampling import training_windows
from recpost.data.shards import RankWindowSampler, rank_windows, user_bounds, user_windows
from recpost.methods import SFT
from tests.helpers import TINY_BACKBONE, write_tiny_interactions

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("val/ndcg@10", "val/hr@10", "val/mrr", "val/coverage@10", "val/n_users")


def pairs(start: np.ndarray, end: np.ndarray) -> list[tuple[int, int]]:
    return sorted(zip(start.tolist(), end.tolist()))


def sequences(seed: int = 0, users: int = 57):
    """Users' training sequences ``[start, end)`` in one flat array (3..40 items each)."""
    lengths = np.random.default_rng(seed).integers(3, 41, size=users)
    offsets = np.r_[0, np.cumsum(lengths)]
    return offsets[:-1], offsets[1:]


@pytest.mark.parametrize("world, per_window, bootstrap", [(2, 8, False), (3, 8, False), (4, 1, False), (2, 8, True)])
def test_the_ranks_windows_are_disjoint_blocks_whose_union_is_every_window(world, per_window, bootstrap):
    start, end = sequences()
    weights = np.random.default_rng(1).integers(0, 3, size=len(start)) if bootstrap else np.ones(len(start), dtype=np.int64)
    everything = pairs(*training_windows(start, end, 8, per_window, weights, bootstrap))
    shards = [rank_windows(start, end, 8, per_window, weights, bootstrap, SimpleNamespace(world_size=world, global_rank=r))
              for r in range(world)]
    union = sorted(p for w_start, w_end, _ in shards for p in pairs(w_start, w_end))
    assert union == everything  # every window once (a bootstrap's repeats as often as in one process)
    users = [shard.users for _, _, shard in shards]
    assert users[0].start == 0 and users[-1].stop == len(start)
    assert all(a.stop == b.start for a, b in zip(users, users[1:]))  # contiguous blocks of users, in cache order
    counts = [len(w_start) for w_start, _, _ in shards]
    assert all(shard.n_common == max(counts) for _, _, shard in shards)
    assert max(counts) - min(counts) <= user_windows(start, end, per_window, weights).max()  # balanced to one user


def test_one_process_or_fewer_users_than_ranks_keeps_every_window():
    start, end = sequences(users=3)
    ones = np.ones(3, dtype=np.int64)
    everything = pairs(*training_windows(start, end, 8, 8, ones, False))
    for trainer in (None, SimpleNamespace(world_size=1, global_rank=0), SimpleNamespace(world_size=4, global_rank=3)):
        w_start, w_end, shard = rank_windows(start, end, 8, 8, ones, False, trainer)
        assert shard is None and pairs(w_start, w_end) == everything


def test_user_bounds_split_the_windows_evenly_over_contiguous_users():
    assert user_bounds(np.array([1, 1, 1, 1, 1, 1]), 2).tolist() == [0, 3, 6]
    assert user_bounds(np.array([1, 2, 3, 4, 5, 6, 7]), 3).tolist() == [0, 4, 6, 7]  # 10, 11, 7 windows


def test_the_rank_sampler_yields_its_own_windows_then_repeats_up_to_the_common_count():
    order = [3, 0, 2, 1]
    sampler = RankWindowSampler(order, n_local=4, n_common=7, rank=1, world_size=2)
    assert list(sampler) == [3, 0, 2, 1, 3, 0, 2] and len(sampler) == 7
    assert isinstance(sampler, torch.utils.data.DistributedSampler)  # so Lightning does not wrap it again


class RecordingData(RecDataModule):
    """Remembers which training windows this rank's batches used."""

    used: list[int]

    def train_batch(self, windows):
        self.used = getattr(self, "used", []) + list(windows)
        return super().train_batch(windows)


def datamodule(folder: Path, cls=RecDataModule) -> RecDataModule:
    data = folder / "tiny.csv"
    if not data.is_file():
        write_tiny_interactions(data)
    return cls(Table(str(data), name="tiny"), max_len=8, batch_size=16, eval_batch_size=16,
               cache_dir=str(folder / "cache"))


def fit_on_two_ranks(folder: Path) -> None:
    """Each of the two ranks (launched by Lightning): one SFT epoch, then its record as JSON."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = datamodule(folder, RecordingData)
    model = SFT(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=dm.max_len, backbone=TINY_BACKBONE, lr=0.01)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    w_start, w_end = dm.train_windows()
    rank = trainer.global_rank
    record = {"windows": pairs(w_start, w_end), "used": [[int(w_start[i]), int(w_end[i])] for i in dm.used],
              "batches": trainer.num_training_batches,
              "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
    (folder / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save(model.state_dict(), folder / "weights.pt")


@pytest.mark.slow
def test_two_gloo_ranks_train_on_disjoint_windows_and_report_one_process_metrics(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tests.test_scale_ddp", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = datamodule(tmp_path)
    everything = pairs(*one.train_windows())
    built = [{tuple(w) for w in rank["windows"]} for rank in ranks]
    assert not built[0] & built[1]  # disjoint
    assert sorted(map(tuple, ranks[0]["windows"] + ranks[1]["windows"])) == everything  # their union: one process's set
    assert all(len(rank["windows"]) < len(everything) for rank in ranks)  # each built only its share
    used = [{tuple(w) for w in rank["used"]} for rank in ranks]
    assert used == built  # each trained on all of its own windows, none of the other's
    assert ranks[0]["batches"] == ranks[1]["batches"] and len(ranks[0]["used"]) == len(ranks[1]["used"])
    # the metrics the two ranks computed together are one process's on the same weights
    model = SFT(n_items=one.n_items, item_map_hash=one.item_map_hash, max_len=one.max_len, backbone=TINY_BACKBONE)
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    single = trainer.validate(model, datamodule=one, verbose=False)[0]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    for name in METRICS:
        assert ranks[0]["metrics"][name] == pytest.approx(single[name], abs=1e-6), name


if __name__ == "__main__":  # launched by the test above (and, for rank 1, by Lightning)
    fit_on_two_ranks(Path(sys.argv[1]))
