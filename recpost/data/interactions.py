"""Interactions -> cleaned, remapped, chronologically sorted per-user sequences.

:func:`preprocess` turns a source's validated table into the rows the cache stores (``recpost.data.cache``):
duplicates dropped, repeats and k-core filtered, users too short for the split dropped, ids remapped to
``1..n_items`` (0 = padding) and sorted by time. :class:`Interactions` is what a loaded cache entry gives.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recpost.data.validation import validate_interactions
from recpost.core.errors import RecpostError

log = logging.getLogger(__name__)
MIN_USER_INTERACTIONS = 3  # train >= 1 item, a validation target, a test target


@dataclass(frozen=True)
class PreprocessOptions:
    """Cleaning rules; all of them key the cache."""

    min_interactions: int = 0  # iterative k-core on users and items (Amazon's usual 5-core: 5)
    duplicates: str = "drop"  # exact (user, item, timestamp) repeats: "drop" with a warning, or "error"
    keep_repeats: bool = False  # keep later interactions with an already-seen item (default: first only)


@dataclass
class Interactions:
    """Sorted per-user sequences in CSR form (all arrays memory-mapped where possible).

    ``item[offsets[u]:offsets[u + 1]]`` is user ``u``'s chronological sequence (internal item ids,
    1..n_items); ``rating`` and ``timestamp`` are aligned with it.
    """

    item: np.ndarray  # [N] int64
    rating: np.ndarray  # [N] float32
    timestamp: np.ndarray  # [N] int64
    offsets: np.ndarray  # [n_users + 1] int64
    n_items: int
    item_map_hash: str
    item_ids: datasets.Dataset  # original item ids, row i -> internal i + 1
    user_ids: datasets.Dataset  # original user ids, row u -> internal u
    meta: dict

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1


def item_map_hash(original_item_ids: pa.Array | pa.ChunkedArray) -> str:
    """sha256 over the ordered original item ids: equal iff two catalogs map ids identically."""
    ids = original_item_ids.cast(pa.string()).to_pylist()  # once per cache build; 10^6 ids take < 1 s
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _remap(values: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dense ids 0..n-1 in sorted order of the original ids, and the sorted originals.

    Ids are strings in the canonical table; when all of them are integers (MovieLens) they are
    ordered by value, so ``2`` comes before ``10`` and MovieLens item ``i`` stays internal ``i``.
    """
    uniq = pc.unique(values)
    try:
        as_int = uniq.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        order = pc.sort_indices(uniq)
    else:  # the string breaks ties between spellings of one number ("7", "007")
        keys = pa.table({"value": as_int, "text": uniq})
        order = pc.sort_indices(keys, sort_keys=[("value", "ascending"), ("text", "ascending")])
    uniq = uniq.take(order)
    index = pc.index_in(values, value_set=uniq)
    return np.asarray(index.to_numpy(), dtype=np.int64), uniq


def _kcore(user: np.ndarray, item: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """Rows of ``keep`` that survive iterative k-core filtering (every user and item >= k rows)."""
    keep = keep.copy()
    while True:
        u_counts = np.bincount(user[keep], minlength=user.max() + 1)
        i_counts = np.bincount(item[keep], minlength=item.max() + 1)
        new_keep = keep & (u_counts[user] >= k) & (i_counts[item] >= k)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def preprocess(raw: pa.Table, where: str, rating_range: tuple[float, float], opts: PreprocessOptions,
               timestamp_unit: str = "auto") -> tuple[pa.Table, pa.Array, pa.Array, dict]:
    """Validate, deduplicate, filter, remap and sort. Returns (rows, item map, user map, stats)."""
    table = validate_interactions(raw, where, rating_range, timestamp_unit)
    stats: dict = {"raw_rows": table.num_rows}
    user_str, item_str = table.column("user_id"), table.column("item_id")
    user, user_map = _remap(user_str)
    item, item_map = _remap(item_str)
    ts = table.column("timestamp").to_numpy()
    rating = table.column("rating").to_numpy()

    # Chronological order per user; ties keep file order (lexsort is stable, last key is primary).
    order = np.lexsort((np.arange(len(user)), ts, user))
    user, item, ts, rating = user[order], item[order], ts[order], rating[order]

    # Exact (user, item, timestamp) repeats. Rows are sorted by (user, ts) only, so equal triples need
    # not be adjacent when one user has several items at one timestamp: sort by (pair, ts) to find them.
    pair = user * (int(item.max()) + 1) + item
    by_pair = np.lexsort((np.arange(len(user)), ts, pair))
    p, t = pair[by_pair], ts[by_pair]
    same = np.zeros(len(user), dtype=bool)
    same[by_pair[1:]] = (p[1:] == p[:-1]) & (t[1:] == t[:-1])
    n_dup = int(same.sum())
    stats["duplicate_rows"] = n_dup
    if n_dup:
        first = int(order[np.flatnonzero(same)[0]]) + 1
        if opts.duplicates == "error":
            raise RecpostError(
                f"{where}: {n_dup} duplicate (user, item, timestamp) rows (first at row {first}); remove them or "
                "set data.duplicates: drop"
            )
        log.warning("%s: dropped %d duplicate (user, item, timestamp) rows (first at row %d)", where, n_dup, first)

    keep = ~same
    if not opts.keep_repeats:
        # First interaction with each (user, item) pair; later ones (re-watches, re-ratings) dropped.
        # by_pair is stable in time, so the first row of each pair run is the earliest.
        repeat = np.zeros(len(user), dtype=bool)
        repeat[by_pair[1:]] = p[1:] == p[:-1]
        stats["repeat_rows"] = int((repeat & keep).sum())
        keep &= ~repeat
    if opts.min_interactions > 0:
        keep = _kcore(user, item, keep, opts.min_interactions)
    user_counts = np.bincount(user[keep], minlength=len(user_map))
    short_users = (user_counts > 0) & (user_counts < MIN_USER_INTERACTIONS)
    stats["dropped_short_users"] = int(short_users.sum())
    keep &= ~short_users[user]
    if stats["dropped_short_users"]:
        log.info("%s: dropped %d users with fewer than %d interactions", where, stats["dropped_short_users"], MIN_USER_INTERACTIONS)
    if not keep.any():
        raise RecpostError(_no_users_left(where, opts, stats))
    user, item, ts, rating = user[keep], item[keep], ts[keep], rating[keep]

    # Re-densify ids after filtering: users 0..U-1, items 1..I (0 = padding).
    used_users, user = np.unique(user, return_inverse=True)
    used_items, item = np.unique(item, return_inverse=True)
    item = item + 1
    user_map = user_map.take(pa.array(used_users))
    item_map = item_map.take(pa.array(used_items))
    rows = pa.table({
        "user": pa.array(user.astype(np.int64)),
        "item": pa.array(item.astype(np.int64)),
        "rating": pa.array(rating.astype(np.float32)),
        "timestamp": pa.array(ts.astype(np.int64)),
    })
    stats.update(rows=rows.num_rows, n_users=len(user_map), n_items=len(item_map))
    return rows, item_map, user_map, stats


def _no_users_left(where: str, opts: PreprocessOptions, stats: dict) -> str:
    """Why no user is left, and the fix that applies: the k-core filter, else the data itself."""
    needs = f"each user needs >= {MIN_USER_INTERACTIONS} interactions: a training item, a validation and a test target"
    if opts.min_interactions > 0:
        return (f"{where}: no users left after filtering (min_interactions={opts.min_interactions}, {needs}); lower "
                "data.min_interactions or use more data")
    repeats = stats.get("repeat_rows", 0)
    dropped = f"; {repeats} repeated (user, item) rows were dropped, data.keep_repeats: true keeps them" if repeats else ""
    return f"{where}: no user has {MIN_USER_INTERACTIONS} or more interactions ({needs}){dropped}; use data with longer histories"
