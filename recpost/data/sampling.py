"""Training samples: how users' sequences are cut into windows (``training_windows``) and the
length-grouped order of those windows.

Length-grouped training order: batches of windows of similar length, so that little of an epoch's
compute goes to padding (a batch is padded to its longest window).

The idea of Hugging Face's ``LengthGroupedSampler`` (``group_by_length``) and fairseq's bucketing,
written here because ours must hand whole batches to a plain ``BatchSampler`` (and, under DDP, to
Lightning's ``DistributedSamplerWrapper``, which keeps the order and strides it over ranks): each
epoch the windows are shuffled, cut into pools of ``pool`` batches, each pool is sorted by length and
cut into batches, and the batches are shuffled (the one short batch, if any, last, so that every
other run of ``batch_size`` consecutive indices is one of these batches). Which windows share a
batch, and the batch order, change every epoch; each window is still used exactly once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Window indices in length-grouped batch order (see the module docstring).

    Args:
        lengths: each window's number of inputs ``[N]``.
        batch_size: windows per batch (the DataLoader's).
        pool: batches per sorted pool: larger pools waste less padding and mix less randomly.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, pool: int) -> None:
        super().__init__()
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.pool = pool

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        """One epoch's batches of window indices, in training order."""
        n, size = len(self.lengths), self.batch_size
        order = rng.permutation(n)
        batches = []
        for start in range(0, n, size * self.pool):
            chunk = order[start:start + size * self.pool]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]  # longest first; ties stay shuffled
            batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
        short = [b for b in batches if len(b) < size]
        full = [b for b in batches if len(b) == size]
        return [full[i] for i in rng.permutation(len(full))] + short

    def __iter__(self) -> Iterator[int]:
        # A fresh seed from torch's generator each epoch, as RandomSampler draws one: seeded runs repeat.
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        batches = self.batches(np.random.default_rng(seed))
        return iter(np.concatenate(batches).tolist() if batches else [])


def training_windows(start: np.ndarray, end: np.ndarray, max_len: int, per_window: int,
                     user_weights: np.ndarray, bootstrap: bool) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of every training window over users' training sequences ``[start, end)``.

    Each sequence's ``end - start - 1`` targets are cut from the end into windows of ``per_window``
    targets (``max_len``: consecutive windows sharing one item; 1: one window per target, ending at it),
    each with up to ``max_len`` inputs before its targets. A user's windows are repeated by
    ``user_weights`` (the bootstrap resample's counts, else ones).
    """
    n_targets = np.maximum(end - start - 1, 0)
    n_user = -(-n_targets // per_window)  # windows per user
    n_win = n_user * user_weights
    user = np.repeat(np.arange(len(start)), n_win)
    k = np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win)  # window index within user
    if bootstrap:  # a user drawn c times: windows 0..w-1, c times over
        k = k % np.maximum(n_user, 1)[user]
    w_end = end[user] - k * per_window
    return np.maximum(start[user], w_end - max_len - 1), w_end
