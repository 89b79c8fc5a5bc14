"""Interactions -> cleaned, remapped, chronologically sorted per-user sequences, cached on disk.

The cache is an HF ``datasets`` folder (Arrow, memory-mapped on reuse) keyed by the source's
fingerprint and the preprocessing options. It is written to a temporary folder and renamed into
place, so concurrent ranks (DDP) or an interrupted run never leave a half-written cache that looks
complete.

Layout of one cache entry::

    <cache_dir>/<source>-<key>/
        interactions/   rows sorted by (user, timestamp, file order): user, item, rating, timestamp
        items/          original item id of internal item i+1 (row i); internal 0 is padding
        users/          original user id of internal user u (row u)
        meta.json       counts, options and ``item_map_hash``
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
from filelock import FileLock
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.table import InMemoryTable

from recpost.data.sources import Source
from recpost.data.validation import validate_interactions
from recpost.core.errors import RecpostError

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: integer ids ordered by value, not as text
MIN_USER_INTERACTIONS = 3  # train >= 1 item, a validation target, a test target


def default_cache_dir() -> Path:
    env = os.environ.get("RECPOST_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "recpost" / "cache"


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


def preprocess(raw: pa.Table, where: str, rating_range: tuple[float, float], opts: PreprocessOptions) -> tuple[pa.Table, pa.Array, pa.Array, dict]:
    """Validate, deduplicate, filter, remap and sort. Returns (rows, item map, user map, stats)."""
    table = validate_interactions(raw, where, rating_range)
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
        raise RecpostError(
            f"{where}: no users left after filtering (min_interactions={opts.min_interactions}, each user needs "
            f">= {MIN_USER_INTERACTIONS} interactions); lower data.min_interactions or use more data"
        )
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


def cache_key(source: Source, opts: PreprocessOptions) -> str:
    payload = json.dumps(
        {"version": CACHE_VERSION, "source": source.fingerprint(), "options": opts.__dict__}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _save(ds_table: pa.Table, path: Path) -> None:
    datasets.Dataset(InMemoryTable(ds_table)).save_to_disk(str(path))


def build_cache(source: Source, opts: PreprocessOptions, cache_dir: Path | None = None) -> Path:
    """Make sure the cache entry exists (build it atomically if not) and return its folder.

    Processes that start together (every DDP rank, every node sharing the cache folder) take a file
    lock: the first one builds the entry, the others wait and then read it. This happens when the
    model's catalog size is linked from the data, before any process group exists, so a file lock (the
    ``filelock`` package, as HF datasets uses) rather than a collective.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / f"{source.name}-{cache_key(source, opts)}"
    if (target / "meta.json").is_file():
        return target
    locks = cache_dir / ".locks"  # lock files stay (removing them would race), out of the entries' way
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{target.name}.lock"))
        lock.acquire()
    except OSError as exc:
        raise RecpostError(f"the data cache folder {cache_dir} cannot be written ({exc.strerror or exc}); set "
                           "RECPOST_CACHE_DIR (or data.cache_dir) to a writable folder") from None
    try:
        if (target / "meta.json").is_file():  # another process built it while we waited
            return target
        return _build(source, opts, cache_dir, target)
    finally:
        lock.release()


def _build(source: Source, opts: PreprocessOptions, cache_dir: Path, target: Path) -> Path:
    raw = source.load()
    where = getattr(source, "path", None) or source.name
    rows, item_map, user_map, stats = preprocess(raw, str(where), source.rating_range, opts)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}-"))
    try:
        datasets.disable_progress_bars()
        _save(rows, tmp / "interactions")
        _save(pa.table({"item_id": item_map}), tmp / "items")
        _save(pa.table({"user_id": user_map}), tmp / "users")
        meta = {
            "source": source.fingerprint(), "options": opts.__dict__, "item_map_hash": item_map_hash(item_map),
            "rating_range": list(source.rating_range), **stats,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:  # another rank finished first: its copy is identical
            if not (target / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s: %d users, %d items, %d interactions -> %s", source.name, stats["n_users"],
             stats["n_items"], stats["rows"], target)
    return target


def load_cache(path: Path) -> Interactions:
    """Open a cache entry; the Arrow columns are memory-mapped, not read into memory."""
    datasets.disable_progress_bars()
    meta = json.loads((path / "meta.json").read_text())
    rows = datasets.load_from_disk(str(path / "interactions"))
    table = rows.data.table

    def col(name: str, dtype) -> np.ndarray:
        arr = table.column(name)
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
        return arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)

    user = col("user", np.int64)
    offsets = np.zeros(meta["n_users"] + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=meta["n_users"]), out=offsets[1:])
    return Interactions(
        item=col("item", np.int64),
        rating=col("rating", np.float32),
        timestamp=col("timestamp", np.int64),
        offsets=offsets,
        n_items=meta["n_items"],
        item_map_hash=meta["item_map_hash"],
        item_ids=datasets.load_from_disk(str(path / "items")),
        user_ids=datasets.load_from_disk(str(path / "users")),
        meta=meta,
    )
