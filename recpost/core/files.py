"""Atomic writes: the one way recpost writes a file (or a folder) that someone reads later.

A file is written under a hidden temporary name in its destination folder, flushed to disk (``fsync``),
then renamed over the final name (``os.replace``, atomic within one file system). A reader sees the old
file or the new one, never half of either; a write that fails (a full disk, an interrupt, a crash) leaves
the previous file as it was and nothing new under the final name. The temporary file lives in the
destination folder, not the system's temp dir, because a rename across file systems is a copy, which is
neither atomic nor safe on a full disk (what ``fsspec``'s transactions, and so Lightning's checkpoint
writer, do when the run folder is on another disk than ``/tmp``).

Failures become one :class:`RecpostError` line naming the final path (never the temporary one), the
free space when the disk is full, and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from recpost.core.errors import RecpostError

# Errors that mean "no room": a full disk or an exhausted quota.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
TEMP_PREFIX = ".tmp-"  # hidden, and the final name (with its extension) kept after it: ``.tmp-x1y2-last.ckpt``


def size_text(n_bytes: float) -> str:
    """``n_bytes`` for a person: ``812 B``, ``3.4 MB``, ``1.2 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n_bytes) < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} TB"


def free_bytes(folder: str | Path) -> int | None:
    """Free space where ``folder`` (or its nearest existing parent) lives; ``None`` when it cannot be read."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def no_space_error(what: str, folder: Path, needed: int | None = None) -> RecpostError:
    """The one line for a full disk: what was not written, where, the free space and what it needs."""
    free = free_bytes(folder)
    room = f"{size_text(free)} free" if free is not None else "no space"
    need = f", about {size_text(needed)} needed" if needed else ""
    return RecpostError(f"no space left on the disk of {folder} to write {what} ({room}{need}); free some space "
                        "there or write to another disk (nothing was left half-written)")


def check_space(what: str, folder: str | Path, needed: int) -> None:
    """Refuse before writing ``needed`` bytes into ``folder`` when its disk has less free space."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise no_space_error(what, Path(folder), needed)


def write_error(path: Path, exc: OSError, needed: int | None = None) -> RecpostError:
    """One line for an ``OSError`` met while writing ``path`` (the final name, never the temporary one)."""
    if exc.errno in NO_SPACE:
        return no_space_error(str(path), path.parent, needed)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RecpostError(f"cannot write {path} ({exc.strerror}); make {path.parent} writable or write elsewhere")
    return RecpostError(f"cannot write {path} ({exc.strerror or exc}); check the path (the previous file, if any, "
                        "is unchanged)")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a file system that cannot sync a folder is left as it is)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (by any writer: ``torch.save``, ``savefig``, ...); on a
    clean exit it is synced and renamed over ``path``, on an error removed. The temporary name ends with
    ``path``'s name, so writers that pick a format from the extension pick the right one.

    ``needed``: the bytes about to be written, when known: refused at once if the disk has less room.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    if needed is not None:
        check_space(str(path), path.parent, needed)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=f"-{path.name}")
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc, needed) from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; an ordinary file is not
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc, needed) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_folder(path.parent)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` that replaces ``path`` only once the ``with`` block ends without error."""
    if "w" not in mode:
        raise ValueError(f"atomic_open writes files; mode {mode!r} does not")
    with atomic_path(path) as tmp, tmp.open(mode, **kwargs) as fh:
        yield fh


def write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (checked against the free space first)."""
    with atomic_path(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextmanager
def atomic_folder(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``target`` to fill; on a clean exit it is renamed to ``target``.

    ``replace``: an existing ``target`` is swapped out for the new folder (and then deleted); otherwise an
    existing ``target`` wins (another process finished the same folder first) and the new one is dropped.
    On an error the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    except OSError as exc:
        raise write_error(target, exc) from None
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for file in (p for p in tmp.rglob("*") if p.is_file()):
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
        if target.exists() and replace:
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or replace:
                raise
    except OSError as exc:
        if old is not None and not target.exists():
            os.rename(old, target)  # put the previous folder back
            old = None
        raise write_error(target, exc) from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    _fsync_folder(target.parent)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` alone can only be
    read by setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
