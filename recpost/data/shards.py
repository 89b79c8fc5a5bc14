"""Each DDP rank's own share of the training windows: a contiguous block of users, balanced by windows.

Without it every rank cuts every user's sequence into windows and Lightning's ``DistributedSampler`` then
picks every ``world_size``-th window: each rank holds (and, with ``train_samples: prefixes``, allocates
``16 bytes x targets`` for) the whole data set's windows to use ``1 / world_size`` of them. With it
(``RecDataModule(per_rank_windows=True)``, the default) rank ``r`` builds only the windows of its users
``[bounds[r], bounds[r + 1])`` and reads only their rows of the memory-mapped cache for training:

- the blocks follow the users' order in the cache, so a rank's rows are one contiguous range of the Arrow
  columns (pages another rank never touches);
- they are balanced by windows, computed from the per-user counts alone (``O(users)``, no window built),
  so every rank knows every rank's count without communicating;
- every rank yields the same number of windows per epoch (the largest rank's count: the others repeat
  their first windows, as ``DistributedSampler`` pads its shards), so no rank waits at a collective for
  a batch another does not have.

``RankWindowSampler`` is a ``DistributedSampler``, so Lightning leaves it in place instead of wrapping the
training loader in one of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DistributedSampler, RandomSampler, Sampler

from recpost.data.sampling import training_windows


def user_bounds(user_windows: np.ndarray, world_size: int) -> np.ndarray:
    """``[world_size + 1]`` user boundaries: rank ``r`` owns users ``bounds[r]:bounds[r + 1]``, contiguous
    blocks with about ``sum(user_windows) / world_size`` windows each (``user_windows [U]``: each user's)."""
    done = np.cumsum(user_windows)  # windows of the users up to and including each
    targets = done[-1] * np.arange(1, world_size) / world_size if len(done) else np.zeros(world_size - 1)
    inner = np.searchsorted(done, targets, side="left") + 1  # the first user past each share
    return np.concatenate([[0], np.minimum(inner, len(user_windows)), [len(user_windows)]]).astype(np.int64)


class RankWindowSampler(DistributedSampler):
    """This rank's windows ``0..n_local - 1`` in the order of ``order`` (shuffled or length-grouped), then its
    first ones again up to ``n_common`` (the largest rank's count), so every rank runs the same batches."""

    def __init__(self, order: Sampler[int], n_local: int, n_common: int, rank: int, world_size: int) -> None:
        # Not DistributedSampler.__init__: that needs a dataset and a process group; its fields are set here.
        self.order, self.n_local = order, n_local
        self.num_replicas, self.rank, self.epoch, self.seed, self.shuffle, self.drop_last = world_size, rank, 0, 0, True, False
        self.num_samples, self.total_size = n_common, n_common * world_size

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        local = np.fromiter(iter(self.order), dtype=np.int64, count=self.n_local)
        if self.num_samples > self.n_local:
            local = np.resize(local, self.num_samples)  # repeats from the start, as DistributedSampler pads
        return iter(local.tolist())


@dataclass(frozen=True)
class WindowShard:
    """Rank ``rank`` of ``world_size``: its users, and how many windows every rank yields per epoch."""

    rank: int
    world_size: int
    users: slice
    n_common: int

    def sampler(self, order: Sampler[int] | None, n_local: int) -> RankWindowSampler:
        """The training loader's sampler over this rank's ``n_local`` windows (``order``: shuffled if ``None``)."""
        return RankWindowSampler(order or RandomSampler(range(n_local)), n_local, self.n_common, self.rank, self.world_size)


def user_windows(start: np.ndarray, end: np.ndarray, per_window: int, user_weights: np.ndarray) -> np.ndarray:
    """``[U]`` training windows of each user over sequences ``[start, end)``, as ``training_windows`` cuts them
    (``end - start - 1`` targets, ``per_window`` per window, times the user's weight)."""
    return -(-np.maximum(end - start - 1, 0) // per_window) * user_weights


def rank_windows(start: np.ndarray, end: np.ndarray, max_len: int, per_window: int, user_weights: np.ndarray,
                 bootstrap: bool, trainer=None) -> tuple[np.ndarray, np.ndarray, WindowShard | None]:
    """``training_windows`` of this process: under DDP (``trainer.world_size > 1``) only those of its rank's
    block of users, with its :class:`WindowShard`; otherwise (``trainer`` ``None``, one process, or fewer users
    with windows than ranks) every window and ``None``."""
    shard = None
    world = trainer.world_size if trainer is not None else 1
    if world > 1:
        counts = user_windows(start, end, per_window, user_weights)
        bounds = user_bounds(counts, world)
        per_rank = np.add.reduceat(counts, bounds[:-1]) if len(counts) else np.zeros(world)
        if (np.diff(bounds) > 0).all() and (per_rank > 0).all():
            rank = trainer.global_rank
            shard = WindowShard(rank, world, slice(int(bounds[rank]), int(bounds[rank + 1])), int(per_rank.max()))
    users = shard.users if shard else slice(None)
    w_start, w_end = training_windows(start[users], end[users], max_len, per_window, user_weights[users], bootstrap)
    return w_start, w_end, shard
