"""What the tests share: tiny data and configs, tiny modules and checkpoints, running the real CLI,
finding run folders. Test files import from here, never from each other."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

from recpost.models.checkpoint import save_checkpoint
from recpost.data import RecDataModule, Table
from recpost.methods import SFT, RewardModel
from recpost.models import BackboneConfig
from recpost.core.runs import RunFolder, latest_run

__all__ = [
    "TINY_BACKBONE", "TINY_CONFIG", "RunFolder", "assert_same_loss_and_gradients", "build", "init_reward_biases", "last_metrics", "latest_run",
    "metrics_rows", "pretrained_checkpoint",
    "recpost", "reward_model_checkpoint", "save_checkpoint", "tiny_datamodule", "write_tiny_config",
    "write_tiny_interactions", "KillAfterBatches", "edited_checkpoint", "flipped_checkpoint", "unwritable_folder",
    "children_of", "is_running", "recpost_cases",
]

TINY_BACKBONE = BackboneConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.1)


# ----------------------------------------------------------------------------------- tiny data and configs
def write_tiny_interactions(path: Path, n_users: int = 101, n_items: int = 40, seed: int = 0) -> Path:
    """A small ratings CSV (user_id,item_id,rating,timestamp) with 6-14 interactions per user."""
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,rating,timestamp"]
    for u in range(n_users):
        items = rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(6, 15)), replace=False)
        for t, i in enumerate(items):
            lines.append(f"u{u},i{i},{int(rng.integers(1, 6))},{1000 + 10 * t}")
    path.write_text("\n".join(lines) + "\n")
    return path


TINY_CONFIG = """
seed_everything: 0
data:
  source:
    class_path: recpost.data.Table
    init_args:
      path: {csv}
      name: tiny
  max_len: 8
  batch_size: 32
  eval_batch_size: 16
model:
  class_path: recpost.methods.SFT
  init_args:
    backbone:
      d_model: 16
      n_layers: 1
      n_heads: 2
      dropout: 0.1
    lr: 0.01
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: {max_epochs}
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  default_root_dir: {root}
"""


def write_tiny_config(folder: Path, max_epochs: int = 2) -> Path:
    """A complete `recpost fit` config on a tiny CSV: 101 users (uneven over 2 ranks), 40 items; runs go
    to ``<folder>/runs``."""
    data = write_tiny_interactions(folder / "tiny.csv")
    cfg = folder / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(csv=data, max_epochs=max_epochs, root=folder / "runs"))
    return cfg


def tiny_datamodule(tmp_path: Path, **kw) -> RecDataModule:
    """A DataModule on `write_tiny_interactions` data (max_len 8, 64 windows per batch)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_tiny_interactions(tmp_path / "tiny.csv", **kw)
    return RecDataModule(Table(str(data), name="tiny"), max_len=8, batch_size=64, cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------- tiny modules and checkpoints
def build(cls, dm: RecDataModule, seed: int = 0, **kw):
    """A method module of class ``cls`` for ``dm``'s catalog with the tiny backbone (or ``backbone=``), seeded."""
    torch.manual_seed(seed)
    kw = {"backbone": TINY_BACKBONE, **kw}
    return cls(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=dm.max_len, **kw)


def init_reward_biases(rm: RewardModel, dm: RecDataModule) -> RewardModel:
    """Start ``rm``'s head at the baseline predictor of ``dm``'s training ratings (what fit does first)."""
    train = dm.training_interactions()
    rm.init_biases(train.item, train.rating, train.weight)
    return rm


def pretrained_checkpoint(dm: RecDataModule, path: Path, **kw) -> Path:
    return save_checkpoint(build(SFT, dm, **kw), path)


def reward_model_checkpoint(dm: RecDataModule, path: Path, steps: int = 3, seed: int = 0, **kw) -> Path:
    """A RewardModel started at the baseline predictor and trained a few steps on the tiny data."""
    rm = build(RewardModel, dm, seed=seed, **kw)
    init_reward_biases(rm, dm)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2)
    for i in range(steps):
        loss, _ = rm.training_loss(dm.train_batch(list(range(32 * i, 32 * i + 32))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(rm, path)


# ----------------------------------------------------------------------------------- the real CLI
_LAUNCHER = []  # this test process's launcher (recpost.experiment.launch.Launcher), started on first use


def recpost(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``recpost <args>`` in a child process (``env``: variables to add); returns the completed process
    (output captured). The child is forked by the launcher the experiment runner uses (recpost.cli.zygote:
    ``python -m recpost`` in all that matters, tested against a fresh interpreter in test_experiment.py),
    which saves each call its imports (6-9 CPU seconds); ``RECPOST_STAGE_LAUNCH=spawn`` runs
    ``python -m recpost`` instead."""
    import signal
    import tempfile

    from recpost.experiment.launch import Launcher, LauncherGone, launch_mode

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if launch_mode() == "spawn":
        return subprocess.run([sys.executable, "-m", "recpost", *args], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=timeout)
    if not _LAUNCHER or _LAUNCHER[0].proc.poll() is not None:
        _LAUNCHER[:] = [Launcher({**os.environ, "PYTHONUNBUFFERED": "1"}, lambda: None)]
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        try:
            proc = _LAUNCHER[0].start(list(map(str, args)), out, err=str(err), env=env,
                                      cwd=str(cwd) if cwd is not None else os.getcwd())
        except LauncherGone:
            _LAUNCHER.clear()
            raise
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        read = lambda path: path.read_text(errors="replace") if path.is_file() else ""  # noqa: E731
        return subprocess.CompletedProcess(["recpost", *map(str, args)], code, read(out), read(err))


def recpost_cases(cases: dict[str, tuple[list[str], dict]], cwd: Path | None = None,
                  timeout: int = 600) -> dict[str, subprocess.CompletedProcess]:
    """Run ``recpost <args>`` for each named case (with its environment variables added): each in its own
    process, through the real entry point, with its own stdout, stderr and exit code (``recpost`` above:
    forked by the launcher that imported recpost once, so a case costs its own work, not the imports).
    Classes a config names (a test's callback) import from ``cwd``, which is on the path first."""
    path = os.pathsep.join(p for p in (str(cwd or Path.cwd()), os.environ.get("PYTHONPATH")) if p)
    return {name: recpost(*map(str, args), cwd=cwd, timeout=timeout, env={"PYTHONPATH": path, **case_env})
            for name, (args, case_env) in cases.items()}


def metrics_rows(run: RunFolder) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv."""
    with run.metrics_csv.open() as fh:
        return list(csv.DictReader(fh))


def last_metrics(root: Path) -> tuple[RunFolder, list[dict[str, str]]]:
    """The newest run under ``root`` (a ``default_root_dir``) and the rows of its metrics.csv."""
    run = latest_run(root)
    return run, metrics_rows(run)


# ----------------------------------------------------------------------------------- assertions
def assert_same_loss_and_gradients(first, second, batch, seed: int | None = None) -> None:
    """Both modules give the same loss and parameter gradients on ``batch`` (``seed``: the same random
    draws, e.g. sampled negatives, for both)."""
    results = []
    for module in (first, second):
        if seed is not None:
            torch.manual_seed(seed)
        loss, _ = module.training_loss(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    for g_a, g_b in zip(grads_a, grads_b):
        assert torch.allclose(g_a, g_b, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------- damaged files, interrupts
def edited_checkpoint(source: Path, path: Path) -> Path:
    """A copy of ``source`` whose weights were changed after it was saved (its content hash left as it was)."""
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 0.01
    torch.save(ckpt, path)
    return path


def flipped_checkpoint(source: Path, path: Path, n_bytes: int = 64) -> Path:
    """A copy of ``source`` with ``n_bytes`` inverted in the middle of its largest tensor: the file still
    loads (torch does not check the zip records' CRC), only the weights changed, as on a bad disk or copy."""
    import struct
    import zipfile

    with zipfile.ZipFile(source) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(source.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[record.header_offset + 26:record.header_offset + 30])
    middle = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    raw[middle:middle + n_bytes] = bytes(b ^ 0xFF for b in raw[middle:middle + n_bytes])
    path.write_bytes(bytes(raw))
    return path


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder nothing can be created in: read-only permissions, or (as root, who ignores them) a path
    under /sys, where not even root can create a folder."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return Path("/sys/recpost-read-only-test")


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class KillAfterBatches(L.Callback):
    """Kills its own process (SIGKILL: no cleanup, nothing flushed) after ``batches`` training batches, to
    test resuming a run stopped mid-epoch; add it with a ``trainer.callbacks`` config."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.batches:
            os.kill(os.getpid(), signal.SIGKILL)
