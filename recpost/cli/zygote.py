"""``python -m recpost.cli.zygote``: imports the CLI once, then forks one ``recpost`` command per request.

The experiment runner's stages are ``recpost fit|test`` commands, two or three a stage; each fresh
interpreter pays its imports before any work (torch, Lightning — which imports torch's compiler stack,
scipy and matplotlib — jsonargparse, the methods): 6-9 CPU seconds on a 2-core machine, where a stage of
the default study does 10-30 s of work. This program pays them once per study. The runner's side, and
when it is used, is :mod:`recpost.experiment.launch`.

Protocol (JSON lines): after its imports it writes ``{"ready": true}`` (or ``{"ready": false, "why": ...}``
and exits, when forking would not be safe); then for each request ``{"args": [...], "log": path}`` on
stdin (optional: ``"err"``, a separate stderr file; ``"cwd"``; ``"env"``, the child's whole environment)
it forks a child, writes ``{"pid": N}``, waits for the child and writes ``{"exit": code}``. It
exits when stdin closes, and dies with the runner (a parent-death signal set by the runner).

The child is ``python -m recpost <args>`` in all that matters: its own session and process group (the
runner signals the group), stdout and stderr into the log file, stdin from ``/dev/null``, ``sys.argv``
and ``__main__.__spec__`` as ``python -m recpost`` sets them (Lightning's DDP launcher re-runs that
command for the other ranks), and the interpreter's exit up to its teardown: non-daemon threads joined,
atexit handlers (W&B's, Lightning's) run, output flushed (:func:`_exit`). The launcher built
LightningCLI's parsers before forking (:func:`recpost.cli.main.prebuild_parser`) and froze its objects
(``gc.freeze``), so a command pays its own work: ~0.4 s for one refused at parsing, against ~3.6 s with
the parsers built per command and the interpreter's full teardown in the child. Forking is safe because
this process has run no operator, started no Python thread and not touched CUDA; it checks, and
otherwise declines. (The native threads its imports start, OpenBLAS's and
pyarrow's allocator's, are fork-aware, as every forked DataLoader worker relies on.)
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import signal
import sys
import threading
import traceback

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_NAME = 15


def _reply(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _unsafe_to_fork() -> str | None:
    """Why forking this process would not be safe now, or None."""
    import torch

    if torch.cuda.is_initialized():
        return "CUDA is initialised in the launcher"
    # Python threads only: the native ones the imports start (OpenBLAS's workers, pyarrow's jemalloc) stop or
    # reset themselves at fork (pthread_atfork), as every forked DataLoader worker relies on
    threads = threading.active_count()
    return f"{threads} Python threads are running in the launcher" if threads != 1 else None


def _child(args: list[str], log: str, err: str | None = None, cwd: str | None = None,
           env: dict[str, str] | None = None) -> None:
    """In the forked child: become ``python -m recpost <args>`` with output into ``log`` (stderr into
    ``err`` when given), in ``cwd`` with exactly ``env`` when given; never returns."""
    import ctypes
    import ctypes.util

    os.setsid()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the launcher (which dies with the runner)
    # the name top and `ps -o comm` show (15 bytes); `ps -o args` still shows the launcher's command line
    libc.prctl(PR_SET_NAME, f"recpost {args[0] if args else ''}".encode()[:15])
    for target, path in ((1, log), (2, err or log)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[1:1] = extra  # where a fresh interpreter puts PYTHONPATH: after the script's folder
    if cwd is not None:
        os.chdir(cwd)
        sys.path[0] = os.getcwd()  # `python -m` puts the working folder first
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    main_spec = importlib.util.find_spec("recpost.__main__")
    sys.modules["__main__"].__spec__ = main_spec  # what `python -m recpost` sets (Lightning's DDP relaunch reads it)
    sys.argv = [main_spec.origin, *args]
    from recpost.cli.main import main

    code = 0
    try:
        main()
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:  # what the interpreter does with SystemExit("message")
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # what an uncaught exception does in a fresh interpreter
        traceback.print_exc()
        code = 1
    _exit(code)


def _exit(code: int) -> None:
    """The interpreter's exit up to its teardown: wait for non-daemon threads, run the atexit handlers (W&B's,
    Lightning's, logging's, multiprocessing's), flush; then end the process. The teardown itself, which frees
    every object the launcher imported, is skipped: in a forked child it copies each page it touches and
    costs ~3 CPU s a command, and it writes nothing (what a command writes is written or flushed by then)."""
    import atexit

    try:
        threading._shutdown()  # what Py_FinalizeEx does first
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _warm_up() -> None:
    """Everything a command imports on its way (torch, Lightning, the methods: recpost.cli.main imports
    them), imported once here (the cost this program saves), and LightningCLI's parsers built (~1 CPU s a
    command)."""
    from recpost.cli.main import prebuild_parser

    prebuild_parser()


def serve() -> None:
    try:
        _warm_up()
    except Exception as exc:  # noqa: BLE001 - the runner then starts each command in a fresh interpreter
        _reply({"ready": False, "why": f"its warm-up failed: {type(exc).__name__}: {exc}"})
        return
    # The warm-up's objects to the permanent generation: a child's collections no longer walk them (and copy
    # their pages), as CPython's documentation advises for a process that forks (gc.freeze).
    gc.freeze()
    why = _unsafe_to_fork()
    if why:
        _reply({"ready": False, "why": why})
        return
    _reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request["args"], request["log"], request.get("err"), request.get("cwd"), request.get("env"))
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"exit": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
