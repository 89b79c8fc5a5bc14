"""How the runner starts a stage's ``recpost`` commands: forked from one process that imported recpost once.

A fresh ``python -m recpost`` pays 6-9 CPU seconds of imports (torch, Lightning, jsonargparse, the
methods) before any work, two or three times a stage; a default study's stage does 10-30 s of work. So the
runner keeps one launcher process per study (:mod:`recpost.cli.zygote`), which imports the CLI once and
forks each command from there; the child is ``python -m recpost <args>`` in all that matters (own process
group, output into the stage's log, ``sys.argv`` and ``__main__`` as that command sets them, the normal
interpreter exit). Results do not depend on how a command started: each seeds its own random state
(``--seed_everything``); ``tests/test_experiment.py`` runs one fit both ways and compares its metrics.

``RECPOST_STAGE_LAUNCH=spawn`` starts every command as a fresh interpreter instead (what the runner did
before); so does a platform without ``fork`` or ``/proc`` (not Linux), and a launcher that finds forking
unsafe (a thread or CUDA started during its imports) or dies: the runner then says why once and goes on.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ENV = "RECPOST_STAGE_LAUNCH"
MODES = ("fork", "spawn")
READY_TIMEOUT_SECONDS = 600  # the launcher's imports: seconds, minutes on a very busy machine


def launch_mode() -> str:
    """``fork`` (the default on Linux) or ``spawn``, from ``RECPOST_STAGE_LAUNCH``."""
    mode = os.environ.get(ENV, "fork" if sys.platform.startswith("linux") else "spawn").strip().lower()
    if mode not in MODES:
        from recpost.core.errors import RecpostError

        raise RecpostError(f"{ENV}={mode!r}: use fork (one launcher process imports recpost once) or spawn "
                           "(a fresh interpreter per command)")
    return mode if sys.platform.startswith("linux") else "spawn"


class LauncherGone(RuntimeError):
    """The launcher process exited or wrote something unexpected."""


class Launcher:
    """The runner's end of ``python -m recpost.cli.zygote``: JSON lines in, JSON lines out."""

    def __init__(self, env: dict[str, str], preexec_fn: Callable[[], None], python: str = sys.executable,
                 cwd: str | None = None) -> None:
        """``python``, ``cwd``: the interpreter the launcher runs under and its working folder (a test runs
        another environment's: ``python -m`` imports from the working folder first)."""
        self.proc = subprocess.Popen([python, "-m", "recpost.cli.zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cwd,
                                     start_new_session=True, preexec_fn=preexec_fn)
        self._buffer = b""
        ready = self.read(READY_TIMEOUT_SECONDS)
        if ready is None or not ready.get("ready"):
            self.close()
            raise LauncherGone((ready or {}).get("why", "it did not start"))

    def read(self, timeout: float | None) -> dict | None:
        """The launcher's next message, or None when none came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise LauncherGone("it exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            raise LauncherGone(f"it wrote {line[:80]!r}") from exc

    def start(self, args: list[str], log: Path, **options: str | dict | None) -> Forked:
        """Fork ``recpost <args>`` with its output into ``log``; ``options``: ``err`` (stderr's own file),
        ``cwd``, ``env`` (the child's whole environment), as :mod:`recpost.cli.zygote` takes them."""
        request = {"args": args, "log": str(log), **{k: v for k, v in options.items() if v is not None}}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as exc:
            raise LauncherGone(str(exc)) from exc
        message = self.read(READY_TIMEOUT_SECONDS)
        if not message or "pid" not in message:
            raise LauncherGone(f"no process id for the command: {message}")
        return Forked(self, message["pid"], args)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Forked:
    """A command forked by the launcher, with the part of ``subprocess.Popen`` the runner uses: ``pid``
    (also its process group), ``poll``, ``wait``, ``returncode`` (negative: killed by that signal)."""

    def __init__(self, launcher: Launcher, pid: int, args: list[str]) -> None:
        self.launcher, self.pid, self.args = launcher, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                message = self.launcher.read(0)
            except LauncherGone:  # the launcher died: its children die with it (a parent-death signal)
                message = {"exit": -signal.SIGKILL}
            if message is not None:
                self.returncode = int(message["exit"])
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(["recpost", *self.args], timeout)
            time.sleep(0.05)
        return self.returncode


class StageLauncher:
    """Starts ``recpost <args>`` with output into a log file: forked by the launcher (``fork``) or as a
    fresh interpreter (``spawn``, or when the launcher cannot be used; ``say`` tells why, once)."""

    def __init__(self, env: dict[str, str], preexec_fn: Callable[[], None], say: Callable[[str], None]) -> None:
        self.env, self.preexec_fn, self.say = env, preexec_fn, say
        self.mode = launch_mode()
        self._launcher: Launcher | None = None

    def start(self, args: list[str], log: Path, fh) -> subprocess.Popen | Forked:
        """Start the command; ``fh`` is ``log`` opened for writing (a fresh interpreter writes into it)."""
        if self.mode == "fork":
            try:
                if self._launcher is None:
                    self._launcher = Launcher(self.env, self.preexec_fn)
                return self._launcher.start(args, log)
            except LauncherGone as exc:
                self.say(f"warning: stages start as fresh processes from now on (the launcher that imports "
                         f"recpost once cannot be used: {exc}; {ENV}=spawn says so from the start)")
                self.close()
                self.mode = "spawn"
        return subprocess.Popen([sys.executable, "-m", "recpost", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True, preexec_fn=self.preexec_fn)

    def close(self) -> None:
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
