"""The on-disk cache of preprocessed interactions: built once, checked on every load.

The cache is an HF ``datasets`` folder (Arrow, memory-mapped on reuse) keyed by everything that decides
what it holds (:func:`cache_key`). It is written to a temporary folder and renamed into place, so
concurrent ranks (DDP) or an interrupted run never leave a half-written cache that looks complete, and
every load checks it against its ``meta.json`` (file sizes and hashes, row counts): an entry damaged since
(truncated, edited, half-deleted) is rebuilt with one warning, never trusted.

Layout of one cache entry::

    <cache_dir>/<source>-<key>/
        interactions/   rows sorted by (user, timestamp, file order): user, item, rating, timestamp
        items/          original item id of internal item i+1 (row i); internal 0 is padding
        users/          original user id of internal user u (row u)
        meta.json       counts, options, ``item_map_hash``, and the size and SHA-256 of every other file
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable
from filelock import FileLock, Timeout

from recpost.core.errors import RecpostError
from recpost.core.files import NO_SPACE, atomic_folder, check_space, no_space_error
from recpost.data.interactions import Interactions, PreprocessOptions, item_map_hash, preprocess
from recpost.data.sources import Source

log = logging.getLogger(__name__)
# 2: integer ids ordered by value, not as text; 3: rating range and timestamp unit in the key, timestamps
# always seconds, file sizes and hashes in meta.json
CACHE_VERSION = 3
META = "meta.json"
BUILD_FOLDER = re.compile(r"\.(.+-[0-9a-f]{12})-[a-z0-9_]+")  # atomic_folder's temporary name for an entry
ENTRY_OVERHEAD = 1 << 20  # bytes beyond the tables' own: Arrow framing, datasets' JSON files, meta.json


def default_cache_dir() -> Path:
    env = os.environ.get("RECPOST_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "recpost" / "cache"


def cache_key(source: Source, opts: PreprocessOptions) -> str:
    """The entry's key: everything that decides what the cache holds. The source's fingerprint (its
    options and the stamp of its files), the rating range and the timestamp unit that validation applies
    (a file refused under one range must not be reused from an entry built under a wider one), and the
    preprocessing options."""
    payload = json.dumps({
        "version": CACHE_VERSION, "source": source.fingerprint(), "options": opts.__dict__,
        "rating_range": [float(v) for v in source.rating_range], "timestamp_unit": source.timestamp_unit,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


class DamagedCache(Exception):
    """A cache entry that does not match its ``meta.json`` (or cannot be read): rebuilt, never trusted."""


def _save(ds_table: pa.Table, path: Path) -> None:
    datasets.Dataset(InMemoryTable(ds_table)).save_to_disk(str(path))


def open_cache(source: Source, opts: PreprocessOptions, cache_dir: Path | None = None) -> Interactions:
    """The source's interactions from the cache: built if missing; a damaged entry (one that does not match
    its ``meta.json``) is rebuilt after one warning naming it."""
    path = build_cache(source, opts, cache_dir)
    try:
        return load_cache(path)
    except DamagedCache as exc:
        _warn_damaged(path, exc)
    path = build_cache(source, opts, cache_dir, verify=True)
    try:
        return load_cache(path)
    except DamagedCache as exc:
        raise RecpostError(f"the data cache entry {path} cannot be read back right after it was built ({exc}); check "
                           "the disk, or set RECPOST_CACHE_DIR (or data.cache_dir) to another folder") from None


def build_cache(source: Source, opts: PreprocessOptions, cache_dir: Path | None = None, verify: bool = False) -> Path:
    """Make sure the cache entry exists (build it atomically if not) and return its folder.

    An entry counts as there when its ``meta.json`` can be read and every file it lists has its recorded
    size; ``verify``: when it passes all of :func:`load_cache`'s checks too (after they found it damaged). An entry that
    fails is removed, with a warning, and built again. Processes that start together (every DDP rank, every
    node sharing the cache folder) take a file lock: the first one builds the entry, the others wait and
    then read it. This happens when the model's catalog size is linked from the data, before any process
    group exists, so a file lock (the ``filelock`` package, as HF datasets uses) rather than a collective.
    The lock also tells a dead build from a running one: temporary folders of builds whose lock is free
    (a build killed with ``kill -9``) are removed by the next build.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / f"{source.name}-{cache_key(source, opts)}"
    if not verify and _present(target) is None:
        return target
    with _entry_lock(cache_dir, target.name):
        problem = _present(target)
        if problem is None and verify:  # as load_cache checks it: another process may have rebuilt it meanwhile
            try:
                load_cache(target)
            except DamagedCache as exc:
                problem = str(exc)
        if problem is None:  # another process built it while we waited
            return target
        if target.exists():
            if not verify:
                _warn_damaged(target, problem)
            shutil.rmtree(target, ignore_errors=True)
        _remove_dead_builds(cache_dir, target.name)
        return _build(source, opts, cache_dir, target)


@contextmanager
def _entry_lock(cache_dir: Path, entry: str, timeout: float = -1) -> Iterator[None]:
    locks = cache_dir / ".locks"  # lock files stay (removing them would race), out of the entries' way
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{entry}.lock"))
        lock.acquire(timeout=timeout)
    except Timeout:  # an OSError too, but not a folder that cannot be written: another process holds it
        raise
    except OSError as exc:
        raise RecpostError(f"the data cache folder {cache_dir} cannot be written ({exc.strerror or exc}); set "
                           "RECPOST_CACHE_DIR (or data.cache_dir) to a writable folder") from None
    try:
        yield
    finally:
        lock.release()


def _remove_dead_builds(cache_dir: Path, own: str) -> None:
    """Delete the temporary folders (``.<entry>-<random>``) of builds that are no longer running: ours (we
    hold its lock) and any other whose entry lock is free."""
    removed = 0
    for tmp in cache_dir.iterdir():
        match = BUILD_FOLDER.fullmatch(tmp.name)
        if match is None or not tmp.is_dir():
            continue
        entry = match.group(1)
        if entry != own:
            try:
                with _entry_lock(cache_dir, entry, timeout=0):
                    shutil.rmtree(tmp, ignore_errors=True)
            except Timeout:  # that build is running
                continue
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d temporary folder(s) of interrupted cache builds in %s", removed, cache_dir)


def _build(source: Source, opts: PreprocessOptions, cache_dir: Path, target: Path) -> Path:
    raw = source.load()
    where = getattr(source, "path", None) or source.name
    rows, item_map, user_map, stats = preprocess(raw, str(where), source.rating_range, opts, source.timestamp_unit)
    tables = {"interactions": rows, "items": pa.table({"item_id": item_map}), "users": pa.table({"user_id": user_map})}
    needed = sum(t.nbytes for t in tables.values()) + ENTRY_OVERHEAD
    what = f"the data cache of {source.name}"
    check_space(what, cache_dir, needed)
    datasets.disable_progress_bars()
    try:
        with atomic_folder(target) as tmp:
            for name, table in tables.items():
                _save(table, tmp / name)
            meta = {
                "source": source.fingerprint(), "options": opts.__dict__, "item_map_hash": item_map_hash(item_map),
                "rating_range": list(source.rating_range), "timestamp_unit": source.timestamp_unit, **stats,
                "files": _file_records(tmp),
            }
            (tmp / META).write_text(json.dumps(meta, indent=2))
    except (OSError, RecpostError) as exc:
        if _no_space(exc):
            raise no_space_error(what, cache_dir, needed) from None
        raise
    log.info("cached %s: %d users, %d items, %d interactions -> %s", source.name, stats["n_users"],
             stats["n_items"], stats["rows"], target)
    return target


def _no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps: ``datasets`` and Arrow re-raise OS errors) is a full disk."""
    while exc is not None:
        if isinstance(exc, OSError) and (exc.errno in NO_SPACE or "No space left" in str(exc)):
            return True
        if isinstance(exc, RecpostError) and str(exc).startswith("no space left"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _file_records(entry: Path) -> dict[str, list]:
    """``relative path -> [size, sha256]`` of every file of an entry but ``meta.json``."""
    return {str(f.relative_to(entry)): [f.stat().st_size, _sha256(f)]
            for f in sorted(entry.rglob("*")) if f.is_file() and f.name != META}


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _present(entry: Path) -> str | None:
    """Why ``entry`` is not a complete cache entry (cheap checks: ``meta.json`` and the file sizes), or None."""
    if not entry.exists():
        return "missing"
    try:
        meta = json.loads((entry / META).read_text())
    except FileNotFoundError:
        return f"no {META}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{META} cannot be read ({type(exc).__name__})"
    try:
        _check_files(entry, meta, hashes=False)
    except DamagedCache as exc:
        return str(exc)
    return None


def _check_files(entry: Path, meta: dict, hashes: bool) -> None:
    """Every file ``meta`` lists is there with its size (and, ``hashes``, its SHA-256), and no other."""
    records = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(records, dict) or not records:
        raise DamagedCache(f"{META} lists no files")
    for name, record in records.items():
        path = entry / name
        try:
            size = path.stat().st_size
        except OSError:
            raise DamagedCache(f"{name} is missing") from None
        if size != record[0]:
            raise DamagedCache(f"{name} has {size:,} bytes, {META} says {record[0]:,}")
        if hashes and _sha256(path) != record[1]:
            raise DamagedCache(f"{name} does not hash to what {META} recorded (its bytes changed)")
    extra = {str(f.relative_to(entry)) for f in entry.rglob("*") if f.is_file() and f.name != META} - set(records)
    if extra:
        raise DamagedCache(f"{sorted(extra)[0]} is not listed in {META}")


def _warn_damaged(entry: Path, reason: object) -> None:
    log.warning("warning: the data cache entry %s is damaged (%s); it is rebuilt", entry, reason)


def load_cache(path: Path) -> Interactions:
    """Open a cache entry; the Arrow columns are memory-mapped, not read into memory.

    Before anything is used, the entry is checked against its ``meta.json``: every file's size and SHA-256,
    then the row counts of the three tables. Anything that does not match or cannot be read raises
    :class:`DamagedCache` (``open_cache`` then rebuilds the entry).
    """
    datasets.disable_progress_bars()
    try:
        meta = json.loads((path / META).read_text())
        _check_files(path, meta, hashes=True)
        rows = datasets.load_from_disk(str(path / "interactions"))
        item_ids = datasets.load_from_disk(str(path / "items"))
        user_ids = datasets.load_from_disk(str(path / "users"))
        counts = (rows.num_rows, item_ids.num_rows, user_ids.num_rows)
        expected = (meta["rows"], meta["n_items"], meta["n_users"])
    except DamagedCache:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever an unreadable entry raises (OSError, Arrow, JSON, KeyError)
        raise DamagedCache(f"cannot be read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if counts != expected:
        raise DamagedCache(f"holds {counts[0]:,} interactions, {counts[1]:,} items and {counts[2]:,} users; {META} says "
                           f"{expected[0]:,}, {expected[1]:,} and {expected[2]:,}")
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
        item_ids=item_ids,
        user_ids=user_ids,
        meta=meta,
    )
