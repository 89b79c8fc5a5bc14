"""Runs a plan: each stage as ``recpost`` commands (child processes, see :mod:`.launch`) in its own folder,
finished ones reused.

A stage's ``stage.json`` records its commands, its key (a hash of the resolved fit arguments and the
contents of every config file they name) and its result. A stage whose record says ``ok`` for the
same key and test key is reused, so an interrupted experiment resumes; one whose fit key still matches
but whose test arguments changed (a new evaluator RM) only re-runs the test (and, for a stage with
``all_targets``, its second test over every held-out target, whose metrics are stored as ``test_all/...``). Loggers are no part of
either key. Placeholders are resolved here: a stage's needed checkpoints are fitted before it, and a
stage whose required checkpoint is missing (that stage failed) is recorded as failed without running.

Interrupts and concurrency: one experiment per output folder at a time (a file lock, refused with one
line for a second process); records are written to a temporary file and renamed, and one that cannot be
read (a crash of another kind, a hand edit) means "redo the stage", with a warning. Each ``recpost`` child
runs in its own process group; SIGINT and SIGTERM (Ctrl-C) go to that group, which is killed after
``STOP_GRACE_SECONDS`` (a fit's files are atomic: a killed fit leaves none half-written). On Linux a child
also dies with the runner however it dies (``SIGKILL`` too: a parent-death signal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from recpost.core.errors import RecpostError
from recpost.core.files import write_json
from recpost.experiment.launch import Forked, StageLauncher
from recpost.experiment.plan import Plan, Stage, resolve, with_loggers
from recpost.experiment.selection import best_validation  # the rule of best.ckpt, one home
from recpost.experiment.tracking import logger_config, wandb_mode, wandb_settings
from recpost.core.runs import latest_run, run_folders, writable_folder

MARKER = "stage.json"
LOCK = ".experiment.lock"
STOP_GRACE_SECONDS = 3  # after SIGINT / SIGTERM is passed on, the child's group may take this long to stop
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
# The second test of a stage with all_targets (over every held-out target): its job name and metric prefix.
ALL_TARGETS_TEST = "test_all"
# Kept from a finished fit when only the test is re-run.
FIT_FIELDS = ("key", "fit_command", "checkpoint", "fit_seconds", "metrics_csv")


def stage_key(args: list[str]) -> str:
    """Hash of the command and the contents of every config file it reads (edits invalidate)."""
    h = hashlib.sha256(json.dumps(args).encode())
    for flag, value in zip(args, args[1:]):
        if flag == "--config" and Path(value).is_file():
            h.update(Path(value).read_bytes())
    return h.hexdigest()[:16]


def check_output_dir(plan: Plan) -> None:
    """Refuse a folder that holds another experiment's stages (their keys would never match)."""
    owner = plan.out / "experiment.json"
    if not owner.is_file():
        return
    try:
        name = json.loads(owner.read_text()).get("name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise RecpostError(f"{owner} cannot be read, so whose results {plan.out} holds is unknown; choose another "
                           "--output_dir, or delete that file if the folder is this experiment's") from None
    if name != plan.study.name:
        raise RecpostError(f"{plan.out} holds results of another experiment ({owner}); choose another --output_dir")


def claim_output_dir(plan: Plan) -> None:
    check_output_dir(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    _write_json(plan.out / "experiment.json", {"name": plan.study.name, "config": str(plan.study.path)})


@contextmanager
def lock_output_dir(out: Path) -> Iterator[None]:
    """Hold the output folder's lock while the experiment runs: a second ``recpost experiment`` on the same
    folder is refused at once (two runners would fit every stage twice into the same folders)."""
    writable_folder(out, "--output_dir")
    lock = FileLock(str(out / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RecpostError(f"{out} is in use by another `recpost experiment` (it holds {out / LOCK}); wait for it "
                           "to finish, or choose another --output_dir") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def lock_plan(plan: Plan) -> Iterator[None]:
    """The locks of a plan's folders: the output folder's (unless it runs one seed alone) and each of its seed
    folders'. Runs of different seeds (``--only_seed``) share an output folder; a second runner of the same
    seed, or a whole-study runner beside a seed's, is refused at once."""
    with ExitStack() as stack:
        if plan.only_seed is None:
            stack.enter_context(lock_output_dir(plan.out))
        for folder in plan.seed_dirs:
            stack.enter_context(lock_output_dir(folder))
        yield


def read_record(marker: Path, say) -> dict:
    """A stage's record; ``{}`` (redo the stage, with a warning) when it is missing or cannot be read."""
    if not marker.is_file():
        return {}
    try:
        record = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        say(f"warning: {marker} cannot be read ({type(exc).__name__}); the stage is run again")
        return {}
    if not isinstance(record, dict):
        say(f"warning: {marker} is not a stage record; the stage is run again")
        return {}
    return record


def _die_with_parent(parent: int) -> None:
    """In the child, before ``exec``: Linux sends it SIGKILL when the runner dies, however it dies (a fit
    ignores SIGTERM until its epoch ends). If the runner is already gone, the child stops at once."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def _passing_on_signals(proc: subprocess.Popen | Forked) -> Iterator[list[int]]:
    """While ``proc`` runs, SIGINT and SIGTERM sent to the runner go to its process group (listed as they come)."""
    received: list[int] = []

    def pass_on(signum, frame) -> None:
        received.append(signum)
        if proc.poll() is None:
            _signal_group(proc, signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_group(proc: subprocess.Popen | Forked, signum: int) -> None:
    """Send ``signum`` to ``proc``'s process group (its own, from ``start_new_session``) while it has members."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def _stop(proc: subprocess.Popen | Forked) -> None:
    """``STOP_GRACE_SECONDS`` for the child to stop, then its group is killed, workers included (a fit still
    importing or building its data may not look at an interrupt for much longer)."""
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE_SECONDS)
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


class Runner:
    """Runs a plan's stages as ``python -m recpost`` subprocesses, with a rich progress display and W&B loggers."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        mode, message = wandb_mode() if plan.study.wandb is not None else ("disabled", None)
        self.wandb_mode = mode
        self.wandb = wandb_settings(plan.study, mode)
        if message:
            _say(message)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true",
                    **({"WANDB_MODE": mode} if self.wandb else {})}
        self.progress = None
        self.overall = None
        self.reused: set[str] = set()  # the stages reused from an earlier run, not run again
        parent = os.getpid()
        self.launcher = StageLauncher(self.env, lambda: _die_with_parent(parent), self.say)
        self._checkpoints: dict[str, str | None] = {}  # stage name -> its usable best checkpoint (None: none)
        self._fitted_first: dict[str, dict] = {}  # results of stages fitted early for a later stage

    def __enter__(self) -> Runner:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if console.is_terminal:  # a live display only where someone watches; logs get the summary lines
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=console)
            self.progress.start()
            self.overall = self.progress.add_task(f"experiment {self.plan.study.name}", total=len(self.plan.stages))
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.launcher.close()

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.console.print(msg, highlight=False, soft_wrap=True)
        else:
            _say(msg)

    def run(self) -> Iterator[tuple[Stage, dict]]:
        """Each stage of the plan, in order, with its result (what its ``stage.json`` holds).

        A stage's checkpoint is usable by later stages once its fit succeeded; for a stage that nothing
        needed before its own turn, once its test succeeded too (a reward model that cannot even be
        tested is not trained against).
        """
        for stage in self.plan.stages:
            for name in stage.needs:
                self._fit_first(name)
            early = self._fitted_first.get(stage.name)
            if early is not None and early["status"] == "failed":
                result = early
            elif missing := stage.missing(self._checkpoints):
                result = self._not_run(stage, missing)
            else:
                result = self._run(stage)
            self._checkpoints.setdefault(stage.name, result.get("checkpoint") if result["status"] == "ok" else None)
            if self.progress is not None:
                self.progress.advance(self.overall)
            yield stage, result

    def _fit_first(self, name: str) -> None:
        """Fit the stage ``name`` (only fit) unless its checkpoint is known already."""
        if name in self._checkpoints:
            return
        stage = self.plan.stage(name)
        for needed in stage.fit_needs:
            self._fit_first(needed)
        if missing := stage.missing(self._checkpoints, fit_only=True):
            result = self._not_run(stage, missing)
        else:
            result = self._run(stage, test=False)
        self._fitted_first[name] = result
        self._checkpoints[name] = result.get("checkpoint") if result["status"] != "failed" else None

    def _not_run(self, stage: Stage, missing: list[str]) -> dict:
        """The result of a stage that cannot run: a checkpoint it requires does not exist."""
        result = {"status": "failed", "error": f"the {self.plan.stage(missing[0]).method.replace('_', ' ')} stage failed"}
        self.say(f"{stage.label}: failed ({result['error']})")
        return result

    def _run(self, stage: Stage, test: bool = True) -> dict:
        """fit + test in ``stage.directory``; reuse a finished stage with the same command.

        ``test=False`` only fits (a stage whose checkpoint a later stage needs before its own turn).
        """
        fit_args = resolve(stage.fit_args, self._checkpoints)
        key = stage_key(fit_args)
        marker = stage.directory / MARKER
        done = read_record(marker, self.say)
        fitted = done.get("key") == key and done.get("checkpoint") and Path(done["checkpoint"]).is_file()
        if not test and fitted:
            return {**{k: v for k, v in done.items() if k in FIT_FIELDS}, "status": "fitted"}
        test_key = stage_key([*fit_args, "--test", *resolve(stage.test_args, self._checkpoints),
                              *(["--test-all-targets"] if stage.all_targets else [])])
        if test and done.get("key") == key and done.get("status") == "ok" and done.get("test_key") == test_key:
            self.say(f"{stage.label}: reused ({done['status']} {summary(done, stage.monitor, seconds=False)})")
            self.reused.add(stage.name)
            return done
        stage.directory.mkdir(parents=True, exist_ok=True)
        started = time.time()
        run_name = f"{self.plan.study.name}-{stage.label.replace(' ', '-')}"
        run_id = hashlib.sha256(f"{self.plan.out.resolve()}:{stage.directory}:{key}".encode()).hexdigest()[:12]
        if fitted:
            result = {k: v for k, v in done.items() if k in FIT_FIELDS}
            result["fit_metrics"] = done.get("fit_metrics") or {
                k: v for k, v in done.get("metrics", {}).items() if k.startswith("val/")}
        else:
            command = resolve(stage.fit_command, self._checkpoints)
            loggers = logger_config(stage.loggers("fit"), stage.fit_root, self.wandb, run_name, run_id, "fit")
            result = {"key": key, "fit_command": ["recpost", *command]}
            code = self._recpost(with_loggers(command, loggers), stage.log("fit"), stage.fit_root, stage.epochs,
                                 stage.label)
            if code != 0:
                return self._finish(stage, {**result, "status": "failed",
                                            "error": f"fit exited {code}; see {stage.log('fit')}"}, started)
            run = latest_run(stage.fit_root)
            result["checkpoint"] = str(run.best_checkpoint)
            result["fit_metrics"] = best_validation(run.metrics_csv, stage.monitor, stage.mode)
            result["metrics_csv"] = str(run.metrics_csv)
            result["fit_seconds"] = round(time.time() - started, 1)
            if not test:
                result["status"] = "fitted"
                _write_json(marker, result)
                fit = summary({"metrics": result["fit_metrics"], "seconds": result["fit_seconds"]}, stage.monitor)
                self.say(f"{stage.label}: fitted {fit}; tested in its turn")
                return result
        checkpoints = {**self._checkpoints, stage.name: result["checkpoint"]}
        result.update(test_key=test_key, metrics=dict(result["fit_metrics"]))
        tests = [("test", stage.test_command, stage.test_root)]
        if stage.all_targets:  # the same checkpoint over every held-out target: metrics as test_all/...
            tests.append((ALL_TARGETS_TEST, stage.test_all_command, stage.test_all_root))
        for job, args, root in tests:
            command = resolve(args, checkpoints)
            # The test joins the fit's W&B run; the all-targets test has its own (its test/ metrics would
            # overwrite the run's).
            wandb_run = (run_name, run_id, "fit") if job == "test" else (f"{run_name}-{job}", f"{run_id}-{job}", job)
            loggers = logger_config(stage.loggers(job), root, self.wandb, *wandb_run)
            result[f"{job}_command"] = ["recpost", *command]
            code = self._recpost(with_loggers(command, loggers), stage.log(job), label=f"{stage.label} {job}")
            if code != 0:
                return self._finish(stage, {**result, "status": "failed",
                                            "error": f"{job} exited {code}; see {stage.log(job)}"}, started)
            run = latest_run(root)
            metrics = json.loads(run.metrics_json("test").read_text())
            result["metrics"].update({f"{job}/{k.partition('/')[2]}": v for k, v in metrics.items()})
            result["per_user" if job == "test" else f"per_user_{job}"] = (
                str(run.per_user_csv) if run.per_user_csv.is_file() else None)
        result["status"] = "ok"
        return self._finish(stage, result, started)

    def _finish(self, stage: Stage, result: dict, started: float) -> dict:
        result["seconds"] = round(time.time() - started, 1)
        runs = run_folders(stage.fit_root)
        result.setdefault("metrics_csv", str(runs[-1].metrics_csv) if runs else None)
        _write_json(stage.directory / MARKER, result)
        self.say(f"{stage.label}: {result['status']} {summary(result, stage.monitor)}")
        return result

    def _recpost(self, args: list[str], log: Path, watch: Path | None = None, epochs: int | None = None,
                 label: str = "") -> int:
        """Run ``recpost <args>`` with output into ``log``; while it runs, advance the stage's bar by
        the validation epochs found under ``watch`` (the fit's root folder)."""
        task = None
        if self.progress is not None:
            task = self.progress.add_task(f"  {label}", total=epochs)
        with log.open("w") as fh:
            proc = self.launcher.start(args, log, fh)
            with _passing_on_signals(proc) as received:
                while proc.poll() is None and not received:
                    time.sleep(0.5)
                    if task is not None and watch is not None:
                        self.progress.update(task, completed=_epochs_done(watch))
                if received:
                    _stop(proc)
        if task is not None:
            self.progress.remove_task(task)
        if received:
            name = signal.Signals(received[0]).name
            self.say(f"{label}: interrupted ({name}); run the same command again to resume (finished stages are reused)")
            self.__exit__()  # the progress display gives the terminal back
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(128 + received[0])  # at once: tearing down torch & co. takes seconds; the kernel frees the locks
        return proc.returncode


def summary(result: dict, monitor: str, seconds: bool = True) -> str:
    """The one line printed when a stage finishes: its error, or its main metrics (and duration)."""
    if "error" in result:
        return result["error"]
    metrics = result.get("metrics", {})
    keys = dict.fromkeys((monitor, "val/rmse", "test/ndcg@10", "test/rmse", "test/true_reward@10"))  # ordered, unique
    parts = [f"{k}={metrics[k]:.4f}" for k in keys if k in metrics]
    return " ".join(parts) + (f" ({result.get('seconds', 0)} s)" if seconds else "")


def _epochs_done(fit_root: Path) -> int:
    try:
        text = latest_run(fit_root).metrics_csv.read_text()
    except (RecpostError, OSError):
        return 0
    lines = text.splitlines()
    if not lines:
        return 0
    header = lines[0].split(",")
    if "epoch" not in header:
        return 0
    col = header.index("epoch")
    return len({line.split(",")[col] for line in lines[1:] if len(line.split(",")) > col})


def _write_json(path: Path, obj) -> None:
    """Write ``obj`` atomically (``recpost.core.files``): an interrupted write never leaves half a record."""
    write_json(path, obj)


def _say(msg: str) -> None:
    print(msg, flush=True)
