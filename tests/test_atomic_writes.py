"""Every file recpost writes is atomic: a write that fails halfway leaves the previous file as it was and
nothing new under the final name, and ends in one line naming the file (issue 27)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import lightning as L
import pytest
import torch

from recpost.core.errors import RecpostError
from tests.helpers import recpost_cases, write_tiny_config

ROOT = Path(__file__).resolve().parents[1]
PADDING_BYTES = 400_000  # the second epoch's checkpoints grow by this much (as when optimiser state appears)
FREE_BYTES = 64_000  # what the full disk has left when the second epoch's last.ckpt is written


class FullDiskAtSecondLastCheckpoint(L.Callback):
    """From the second epoch on, checkpoints carry ``PADDING_BYTES`` more; just before the second epoch's
    last.ckpt, the run folder's disk is filled but ``FREE_BYTES``, so that overwrite cannot fit."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.current_epoch >= 1:
            checkpoint["padding"] = torch.zeros(PADDING_BYTES, dtype=torch.uint8)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            folder = Path(trainer.default_root_dir)
            with (folder / "filler").open("wb") as fh:
                fh.write(b"\0" * max(shutil.disk_usage(folder).free - FREE_BYTES, 0))


def _files_named_like(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if name in p.name and p.name != name)


# ----------------------------------------------------------------------------------- the helper
@pytest.mark.parametrize("fails_at", ["writing", "fsync", "rename"])
def test_a_write_that_fails_halfway_leaves_the_old_file_and_no_new_final_name(tmp_path, monkeypatch, fails_at):
    import recpost.core.files as files

    old = tmp_path / "results.json"
    old.write_text('{"old": true}\n')
    full = OSError(errno.ENOSPC, "No space left on device")

    def fail(*args, **kwargs):
        raise full

    if fails_at == "fsync":
        monkeypatch.setattr(files.os, "fsync", fail)
    if fails_at == "rename":
        monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(RecpostError, match=rf"^no space left on the disk of {tmp_path} to write {old} \(.* free\)"):
        with files.atomic_open(old) as fh:
            fh.write('{"new": ')
            if fails_at == "writing":
                raise full
            fh.write("true}\n")
    assert old.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left either


def test_a_write_larger_than_the_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import recpost.core.files as files

    monkeypatch.setattr(files, "free_bytes", lambda folder: 999)
    with pytest.raises(RecpostError, match=r"\(999 B free, about 5.0 KB needed\)"):
        files.write_bytes(tmp_path / "x.bin", b"\0" * 5000)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_folder_write_keeps_the_previous_folder(tmp_path):
    from recpost.core.files import atomic_folder

    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError, match="export failed"), atomic_folder(target, replace=True) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("export failed")
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and [p.name for p in target.iterdir()] == ["b.txt"]


def test_the_checkpoint_writer_keeps_the_previous_checkpoint_loadable_when_a_write_fails(tmp_path, monkeypatch):
    import recpost.core.files as files
    from recpost.models.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(RecpostError, match=f"to write {path}"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(300)}, "epoch": 1}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------------------- a real full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (another file system than the system temp dir, as a run folder on its own disk often is);
    skipped where mounting is not permitted."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", f"recpost-{uuid.uuid4().hex[:8]}", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_checkpoint_overwrite_that_fails_halfway_leaves_the_previous_last_ckpt_loadable(tmp_path, small_disk):
    cfg = write_tiny_config(tmp_path, max_epochs=2)
    cfg.write_text(cfg.read_text().replace(f"default_root_dir: {tmp_path / 'runs'}", f"default_root_dir: {small_disk}")
                   + "  callbacks:\n    - class_path: tests.test_atomic_writes.FullDiskAtSecondLastCheckpoint\n")
    out = recpost_cases({"fit": (["fit", "--config", str(cfg)], {})}, cwd=ROOT)["fit"]
    checkpoints = small_disk / "lightning_logs" / "version_0" / "checkpoints"
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith(f"error: no space left on the disk of {checkpoints} to write {checkpoints / 'last.ckpt'}")
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)  # the first epoch's, whole
    assert last["epoch"] == 0 and "padding" not in last
    assert _files_named_like(checkpoints, "last.ckpt") == []
