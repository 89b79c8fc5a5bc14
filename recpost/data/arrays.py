"""The vectorised pieces batches are built from: a dataset of row indices (the collate function gathers
a whole batch at once) and left-padded gathers of variable-length slices."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


class IndexDataset(Dataset):
    """A dataset of row indices (``0..rows - 1``, or the given rows); the collate function turns a list of
    them into one batch."""

    def __init__(self, rows: int | np.ndarray) -> None:
        self.rows = np.arange(rows) if isinstance(rows, int) else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return int(self.rows[i])


def gather_left_padded(values: np.ndarray, start: np.ndarray, end: np.ndarray, width: int, fill=0) -> np.ndarray:
    """``values[start:end]`` per row, right-aligned in a ``[B, width]`` array (the last ``width`` kept)."""
    idx = end[:, None] - width + np.arange(width)[None, :]  # [B, W]
    valid = idx >= np.maximum(start, end - width)[:, None]
    out = values[np.clip(idx, 0, len(values) - 1)]
    return np.where(valid, out, fill)


def gather_sequences(data, start: np.ndarray, end: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items, ratings (float32) and timestamps of ``data`` (``Interactions``) over ``[start, end)`` per row,
    left-padded to ``[B, width]`` each (0 = padding)."""
    return (gather_left_padded(data.item, start, end, width),
            gather_left_padded(data.rating, start, end, width, fill=0.0).astype(np.float32),
            gather_left_padded(data.timestamp, start, end, width))


def earlier_items(data, start: np.ndarray) -> np.ndarray:
    """``[B, H]`` every item of the user before each position ``start`` of ``data`` (``Interactions``), left-padded."""
    user_start = data.offsets[np.searchsorted(data.offsets, start, side="right") - 1]  # [B]
    return gather_left_padded(data.item, user_start, start, max(1, int((start - user_start).max())))


COUNT_CHUNK = 1 << 20  # values counted at a time by count_values (8 MiB of int64)


def count_values(values: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount(values, minlength=minlength)`` a chunk at a time: ``bincount`` copies a read-only input (the
    memory-mapped cache columns are) whole, 8 bytes per value; this copies ``COUNT_CHUNK`` values at most."""
    counts, chunk = np.zeros(minlength, dtype=np.int64), COUNT_CHUNK
    for start in range(0, len(values), chunk):
        part = np.bincount(values[start:start + chunk], minlength=minlength)
        counts[:len(part)] += part
    return counts
