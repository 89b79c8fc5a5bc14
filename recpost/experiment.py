"""``recpost experiment``: the whole study in one command.

Per seed: pretrain (or reuse a given checkpoint) -> reward model (and, optionally, a second one with
another seed as an independent evaluator) -> every post-training method over its grid -> test.
Every stage is a normal ``recpost fit`` / ``recpost test`` run in its own folder under the output
directory, with the exact commands in ``stage.json``, so any row can be re-run alone. A stage whose
``stage.json`` says ``ok`` for the same command and config contents is reused: an interrupted
experiment resumes. Arguments that cannot change a result (loggers, and the evaluator reward model
that only adds a test column) are not part of a stage's key; a change of the test-only arguments
re-runs just the test.

Model selection is on validation only: each run keeps its best ``val/<monitor>`` epoch, and for each
method the setting with the best mean validation metric over seeds is marked ``chosen``. Test
metrics are read once, from the chosen checkpoints and all others alike, never used to choose.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import netrc
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import yaml

from recpost.errors import RecpostError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/experiments/sim.yaml"
TABLE_METRICS = ["ndcg@10", "hr@10", "ndcg@10_liked", "hr@10_liked", "rating@10", "coverage@10", "true_reward@10",
                 "rm_reward@10", "eval_rm_reward@10"]
# Per-user metrics compared against SFT with a paired bootstrap (those present in the test output).
PAIRED_METRICS = ["ndcg@10", "true_reward@10"]
BOOTSTRAP_SAMPLES = 2000
RM_METRICS = ["rmse", "mae", "rmse_global_mean", "rmse_item_mean", "rmse_user_mean"]
# The reward model also ranks (its predicted rating of every item): its ranking metrics, for reference.
RM_RANKING_METRICS = ["ndcg@10", "ndcg@10_liked", "hr@10", "true_reward@10"]
# Offset of the evaluator reward model's seed: a different initialisation and batch order.
EVALUATOR_SEED_OFFSET = 1000
STUDY_KEYS = {"name", "pretrain_config", "data", "pretrained", "methods", "seeds", "posttrain_epochs",
              "pretrain_overrides", "posttrain_overrides", "monitor", "monitor_mode", "reward_model", "wandb"}
METHOD_KEYS = {"config", "grid", "epochs", "overrides"}
RM_KEYS = {"config", "epochs", "overrides", "evaluator"}


@dataclass
class MethodSpec:
    """One post-training method of the study: its config file, the grid of its settings, its budget."""

    name: str
    config: Path
    grid: dict[str, list] = field(default_factory=dict)
    epochs: int | None = None
    overrides: list[str] = field(default_factory=list)
    needs_reward_model: bool = False

    def settings(self) -> list[dict]:
        if not self.grid:
            return [{}]
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in product(*(self.grid[k] for k in keys))]


@dataclass
class RewardModelSpec:
    config: Path
    epochs: int | None = None
    overrides: list[str] = field(default_factory=list)
    evaluator: bool = False


@dataclass
class Study:
    name: str
    pretrain_config: Path
    methods: list[MethodSpec]
    data_config: Path | None = None
    pretrained: list[Path] = field(default_factory=list)
    seeds: int = 1
    posttrain_epochs: int = 10
    pretrain_overrides: list[str] = field(default_factory=list)
    posttrain_overrides: list[str] = field(default_factory=list)
    monitor: str = "val/ndcg@10"
    monitor_mode: str = "max"
    reward_model: RewardModelSpec | None = None
    wandb: dict | None = field(default_factory=dict)


# ----------------------------------------------------------------------------------- config
def _resolve(path: str, base: Path) -> Path:
    """A config path as given, else relative to the experiment file, else to the repository."""
    for candidate in (Path(path), base / path, REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise RecpostError(f"config file not found: {path} (looked in ., {base} and {REPO_ROOT})")


def _known(folder: str) -> list[str]:
    return sorted(p.stem for p in (REPO_ROOT / "configs" / folder).glob("*.yaml"))


def _check_method_class(name: str, config: Path, where: Path) -> bool:
    """The method config must name a recpost method; returns whether it takes a reward model."""
    import importlib

    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    model = model if isinstance(model, dict) else {}
    class_path = model.get("class_path")
    if not class_path:
        raise RecpostError(f"{where}: methods.{name}: {config} sets no model.class_path")
    module, _, cls = class_path.rpartition(".")
    try:
        method = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError):
        method = None
    from recpost.methods import RecModule

    if not (isinstance(method, type) and issubclass(method, RecModule)):
        raise RecpostError(f"{where}: methods.{name}: {class_path} (in {config}) is not a recpost method; "
                           "use one of recpost.methods.SFT, ExpSFT, PPO, DPO, RewardModel")
    return "reward_model" in (model.get("init_args") or {})


def _keys(raw: dict, allowed: set[str], where: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise RecpostError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def load_study(path: str) -> Study:
    cfg_path = _resolve(path, Path.cwd())
    raw = yaml.safe_load(cfg_path.read_text()) or {}
    base = cfg_path.parent
    _keys(raw, STUDY_KEYS, str(cfg_path))
    if "pretrain_config" not in raw or not raw.get("methods"):
        raise RecpostError(f"{cfg_path}: needs pretrain_config and at least one entry under methods")
    methods = []
    for name, spec in raw["methods"].items():
        spec = spec or {}
        _keys(spec, METHOD_KEYS, f"{cfg_path}: methods.{name}")
        if "config" in spec:
            config = _resolve(spec["config"], base)
        elif (REPO_ROOT / "configs" / "method" / f"{name}.yaml").is_file():
            config = REPO_ROOT / "configs" / "method" / f"{name}.yaml"
        else:
            raise RecpostError(f"{cfg_path}: unknown method {name!r}; give methods.{name}.config or use one of "
                               f"{_known('method')}")
        grid = spec.get("grid") or {}
        if "grid" in spec and not grid:
            raise RecpostError(f"{cfg_path}: methods.{name}.grid is empty; remove it or give each key a non-empty list")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise RecpostError(f"{cfg_path}: methods.{name}.grid.{key} must be a non-empty list")
        methods.append(MethodSpec(name, config, grid, spec.get("epochs"), list(spec.get("overrides", [])),
                                  _check_method_class(name, config, cfg_path)))
    rm = None
    if raw.get("reward_model"):
        spec = raw["reward_model"]
        _keys(spec, RM_KEYS, f"{cfg_path}: reward_model")
        rm = RewardModelSpec(_resolve(spec.get("config", "configs/method/reward_model.yaml"), base),
                             spec.get("epochs"), list(spec.get("overrides", [])), bool(spec.get("evaluator", False)))
    needing = [m.name for m in methods if m.needs_reward_model]
    if needing and rm is None:
        raise RecpostError(f"{cfg_path}: methods {needing} train against a reward model; add a reward_model: "
                           "section (e.g. reward_model: {config: ../method/reward_model.yaml})")
    data_config = None
    if raw.get("data"):
        data = str(raw["data"])
        if data in _known("data"):
            data_config = REPO_ROOT / "configs" / "data" / f"{data}.yaml"
        elif data.endswith((".yaml", ".yml")):
            data_config = _resolve(data, base)
        else:
            raise RecpostError(f"{cfg_path}: unknown dataset {data!r}; use one of {_known('data')} or a data config path")
    pretrained = raw.get("pretrained") or []
    pretrained = [_resolve(p, base) for p in ([pretrained] if isinstance(pretrained, str) else pretrained)]
    wandb = raw.get("wandb", {})
    if wandb not in (False, None) and not isinstance(wandb, dict):
        raise RecpostError(f"{cfg_path}: wandb must be false or a mapping (project, entity, group)")
    return Study(
        name=raw.get("name", cfg_path.stem), pretrain_config=_resolve(raw["pretrain_config"], base), methods=methods,
        data_config=data_config, pretrained=pretrained,
        seeds=int(raw.get("seeds", 1)), posttrain_epochs=int(raw.get("posttrain_epochs", 10)),
        pretrain_overrides=list(raw.get("pretrain_overrides", [])),
        posttrain_overrides=list(raw.get("posttrain_overrides", [])), monitor=raw.get("monitor", "val/ndcg@10"),
        monitor_mode=_mode(raw.get("monitor_mode", "max"), cfg_path), reward_model=rm,
        wandb=None if wandb in (False, None) else dict(wandb),
    )


def _mode(mode: str, where: Path) -> str:
    if mode not in ("max", "min"):
        raise RecpostError(f"{where}: monitor_mode must be max or min (got {mode!r})")
    return mode


# ----------------------------------------------------------------------------------- W&B
def wandb_mode() -> tuple[str, str | None]:
    """(mode, message): ``WANDB_MODE`` when set; else online with an API key, offline without one."""
    mode = os.environ.get("WANDB_MODE")
    if mode == "disabled":
        return "disabled", "W&B disabled (WANDB_MODE=disabled): CSV logs only"
    if mode:
        return mode, None
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            has_key = False
    if has_key:
        return "online", None
    return "offline", ("W&B: no API key (WANDB_API_KEY or `wandb login`), logging offline into each stage's "
                       "wandb/ folder; upload later with `wandb sync <folder>`")


def _logger_config(path: Path, csv_dir: Path, wandb: dict | None, run_name: str, run_id: str, job: str) -> Path:
    """A config fragment with the stage's loggers: CSV always (first, so it owns ``log_dir``), W&B too."""
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(csv_dir)}}]
    if wandb is not None:
        loggers.append({"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {
            "project": wandb["project"], "entity": wandb.get("entity"), "group": wandb["group"], "name": run_name,
            "id": run_id, "job_type": job, "save_dir": str(path.parent), "resume": "allow"}})
    path.write_text(yaml.safe_dump({"trainer": {"logger": loggers}}, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------- stages
def _last_run(root: Path) -> Path:
    runs = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not runs:
        raise RecpostError(f"no run folder under {root}")
    return runs[-1]


def _best_val(metrics_csv: Path, monitor: str, mode: str = "max") -> dict[str, float]:
    """All ``val/`` metrics of the epoch with the best monitored value (highest, or lowest for ``min``)."""
    with metrics_csv.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(monitor)]
    if not rows:
        raise RecpostError(f"{metrics_csv} has no {monitor}")
    best = (max if mode == "max" else min)(rows, key=lambda r: float(r[monitor]))
    return {k: float(v) for k, v in best.items() if k.startswith("val/") and v != ""}


def _stage_key(fit_args: list[str]) -> str:
    """Hash of the command and the contents of every config file it reads (edits invalidate)."""
    h = hashlib.sha256(json.dumps(fit_args).encode())
    for flag, value in zip(fit_args, fit_args[1:]):
        if flag == "--config" and Path(value).is_file():
            h.update(Path(value).read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Stage:
    """One row of the study: where it runs, its ``fit`` arguments and what it is called."""

    directory: Path
    fit_args: list[str]
    method: str
    setting: dict
    seed: int
    monitor: str = "val/ndcg@10"
    mode: str = "max"
    test_args: list[str] = field(default_factory=list)  # test-only additions (not in the fit key)
    epochs: int | None = None  # for the progress bar

    @property
    def label(self) -> str:
        tag = "-".join(f"{k}{v}" for k, v in self.setting.items())
        return f"seed {self.seed} {self.method}" + (f" {tag}" if tag else "")


class Runner:
    """Runs stages as ``python -m recpost`` subprocesses, with a rich progress display and W&B loggers."""

    def __init__(self, study: Study, out: Path, total: int) -> None:
        self.study = study
        self.out = out
        self.total = total
        mode, message = wandb_mode() if study.wandb is not None else ("disabled", None)
        self.wandb_mode = mode
        self.wandb = None
        if study.wandb is not None and mode != "disabled":
            self.wandb = {"project": study.wandb.get("project", "recpost"), "entity": study.wandb.get("entity"),
                          "group": study.wandb.get("group", study.name)}
        if message:
            _say(message)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true",
                    **({"WANDB_MODE": mode} if self.wandb else {})}
        self.progress = None
        self.overall = None

    def __enter__(self) -> Runner:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if console.is_terminal:  # a live display only where someone watches; logs get the summary lines
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=console)
            self.progress.start()
            self.overall = self.progress.add_task(f"experiment {self.study.name}", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.console.print(msg, highlight=False, soft_wrap=True)
        else:
            _say(msg)

    def _recpost(self, args: list[str], log: Path, watch: Path | None = None, epochs: int | None = None,
                 label: str = "") -> int:
        """Run ``recpost <args>`` with output into ``log``; while it runs, advance the stage's bar by
        the validation epochs found in ``watch`` (the run's metrics.csv folder)."""
        task = None
        if self.progress is not None:
            task = self.progress.add_task(f"  {label}", total=epochs)
        with log.open("w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "recpost", *args], stdout=fh, stderr=subprocess.STDOUT,
                                    env=self.env)
            while proc.poll() is None:
                time.sleep(0.5)
                if task is not None and watch is not None:
                    self.progress.update(task, completed=_epochs_done(watch))
        if task is not None:
            self.progress.remove_task(task)
        return proc.returncode

    def run(self, stage: Stage, test: bool = True) -> dict:
        """fit + test in ``stage.directory``; reuse a finished stage with the same command.

        ``test=False`` only fits (the pretrained base, tested once the evaluator reward model exists).
        """
        d = stage.directory
        key = _stage_key(stage.fit_args)
        test_key = _stage_key([*stage.fit_args, "--test", *stage.test_args])
        marker = d / "stage.json"
        done = json.loads(marker.read_text()) if marker.is_file() else {}
        if done.get("key") == key and done.get("status") == "ok" and done.get("test_key") == test_key:
            if test:
                self._advance()
            return done
        d.mkdir(parents=True, exist_ok=True)
        started = time.time()
        fit_root = d / "fit"
        run_name = f"{self.study.name}-{stage.label.replace(' ', '-')}"
        run_id = hashlib.sha256(f"{self.out.resolve()}:{d}:{key}".encode()).hexdigest()[:12]
        if done.get("key") == key and done.get("checkpoint") and Path(done["checkpoint"]).is_file():
            if not test:
                return done
            result = {k: v for k, v in done.items()
                      if k in ("key", "fit_command", "checkpoint", "fit_seconds", "metrics_csv")}
            result["fit_metrics"] = done.get("fit_metrics") or {
                k: v for k, v in done.get("metrics", {}).items() if k.startswith("val/")}
        else:
            fit_cmd = ["fit", *stage.fit_args, "--trainer.default_root_dir", str(fit_root)]
            log_cfg = _logger_config(d / "fit_loggers.yaml", fit_root, self.wandb, run_name, run_id, "fit")
            result = {"key": key, "fit_command": ["recpost", *fit_cmd]}
            code = self._recpost([*fit_cmd, "--config", str(log_cfg)], d / "fit.log", fit_root, stage.epochs,
                                 stage.label)
            if code != 0:
                return self._finish(marker, stage, {**result, "status": "failed",
                                                    "error": f"fit exited {code}; see {d / 'fit.log'}"}, started)
            run = _last_run(fit_root)
            result["checkpoint"] = str(run / "checkpoints" / "best.ckpt")
            result["fit_metrics"] = _best_val(run / "metrics.csv", stage.monitor, stage.mode)
            result["metrics_csv"] = str(run / "metrics.csv")
            result["fit_seconds"] = round(time.time() - started, 1)
            if not test:
                result["status"] = "fitted"
                marker.write_text(json.dumps(result, indent=2))
                return result
        test_root = d / "test"
        test_cmd = ["test", *stage.fit_args, *stage.test_args, "--ckpt_path", result["checkpoint"],
                    "--trainer.default_root_dir", str(test_root)]
        log_cfg = _logger_config(d / "test_loggers.yaml", test_root, self.wandb, run_name, run_id, "fit")
        result.update(test_key=test_key, test_command=["recpost", *test_cmd])
        code = self._recpost([*test_cmd, "--config", str(log_cfg)], d / "test.log", label=f"{stage.label} test")
        if code != 0:
            return self._finish(marker, stage, {**result, "status": "failed",
                                                "error": f"test exited {code}; see {d / 'test.log'}"}, started)
        test_run = _last_run(test_root)
        test = json.loads((test_run / "test_metrics.json").read_text())
        per_user = test_run / "test_per_user.csv"
        result.update(status="ok", metrics={**result["fit_metrics"], **test},
                      per_user=str(per_user) if per_user.is_file() else None)
        return self._finish(marker, stage, result, started)

    def _finish(self, marker: Path, stage: Stage, result: dict, started: float) -> dict:
        result["seconds"] = round(time.time() - started, 1)
        result.setdefault("metrics_csv", str(_last_run(stage.directory / "fit") / "metrics.csv")
                          if (stage.directory / "fit" / "lightning_logs").is_dir() else None)
        marker.write_text(json.dumps(result, indent=2))
        self._advance()
        self.say(f"{stage.label}: {result['status']} {_summary(result, stage.monitor)}")
        return result

    def _advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.overall)


def _epochs_done(fit_root: Path) -> int:
    try:
        text = (_last_run(fit_root) / "metrics.csv").read_text()
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


# ----------------------------------------------------------------------------------- results
def _fmt(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _read_per_user(path: str | None) -> dict[int, dict[str, float]]:
    if not path or not Path(path).is_file():
        return {}
    with open(path) as fh:
        return {int(r["user_index"]): {k: float(v) for k, v in r.items() if k != "user_index"} for r in csv.DictReader(fh)}


def paired_bootstrap(runs: list[tuple[dict, dict]], metric: str, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> tuple[float, float, float] | None:
    """Mean difference of ``metric`` (method - reference) over users, with a 95% percentile interval.

    ``runs`` holds one (method per-user rows, reference per-user rows) pair per seed. Each user's
    difference is averaged over the seeds first (the split, hence the users, does not depend on the
    seed), then users are resampled with replacement. Returns (mean, low, high) or None.
    """
    import numpy as np

    per_user: dict[int, list[float]] = {}
    for method_rows, ref_rows in runs:
        for user, row in method_rows.items():
            if user in ref_rows and metric in row and metric in ref_rows[user]:
                per_user.setdefault(user, []).append(row[metric] - ref_rows[user][metric])
    if not per_user:
        return None
    diffs = np.array([np.mean(v) for v in per_user.values()])  # [U]
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(samples, len(diffs)))].mean(axis=1)  # [samples]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diffs.mean()), float(low), float(high)


def _choose(rows: list[dict], groups: dict, monitor: str, mode: str) -> None:
    """Mark each method's setting with the best mean validation metric over seeds as ``chosen``."""
    best: dict[str, tuple[float, str]] = {}
    for (method, setting), rs in groups.items():
        vals = [r[monitor] for r in rs if r["status"] == "ok" and monitor in r]
        if vals:
            score = statistics.mean(vals)
            if method not in best or (score > best[method][0] if mode == "max" else score < best[method][0]):
                best[method] = (score, setting)
    for r in rows:
        r["chosen"] = best.get(r["method"], (None, None))[1] == json.dumps(r["setting"], sort_keys=True)


def write_results(rows: list[dict], out: Path, monitor: str, mode: str = "max", per_user: dict | None = None,
                  reference: str = "sft") -> None:
    """results.json / results.csv (one row per method, setting, seed), results.md (mean ± std over
    seeds, best per column in bold, paired-bootstrap differences to ``reference``) and figures/.

    ``per_user`` maps (method, setting json, seed) to the per-user test rows of that run.
    """
    per_user = per_user or {}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], json.dumps(r["setting"], sort_keys=True)), []).append(r)
    rm_methods = {"reward_model", "eval_reward_model"}
    _choose([r for r in rows if r["method"] not in rm_methods],
            {k: v for k, v in groups.items() if k[0] not in rm_methods}, monitor, mode)
    for r in rows:
        r.setdefault("chosen", r["method"] in rm_methods)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    keys = sorted({k for r in rows for k in r} - {"method", "setting", "seed", "status", "chosen", "error", "metrics_csv"})
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "setting", "seed", "status", "chosen", *keys])
        for r in rows:
            w.writerow([r["method"], json.dumps(r["setting"]), r["seed"], r["status"], r["chosen"],
                        *[r.get(k, "") for k in keys]])
    lines = _policy_table(rows, groups, monitor, mode, per_user, reference)
    rm_rows = [r for r in rows if r["method"] in rm_methods]
    if rm_rows:
        lines += ["", *_rm_table(rm_rows)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    from recpost import figures

    figures.write_all(rows, out / "figures")


def _policy_table(rows, groups, monitor, mode, per_user, reference) -> list[str]:
    policy = {k: v for k, v in groups.items() if k[0] not in ("reward_model", "eval_reward_model")}
    present = [m for m in TABLE_METRICS if any(f"test/{m}" in r for r in rows)]
    cols = [monitor, *[f"test/{m}" for m in present]]
    paired = [m for m in PAIRED_METRICS if f"test/{m}" in cols]
    stats = {key: {c: [r.get(c, math.nan) for r in rs if r["status"] == "ok"] for c in cols} for key, rs in policy.items()}
    best = {}
    for c in cols:
        means = {key: statistics.mean(v) for key, s in stats.items() if (v := [x for x in s[c] if not math.isnan(x)])}
        if means:
            lower = c == monitor and mode == "min"
            best[c] = (min if lower else max)(means, key=means.get)
    header = ["method", "setting", "seeds", *cols, *[f"Δ test/{m} vs {reference} [95% CI]" for m in paired]]
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    n_settings = {}
    for method, _ in policy:
        n_settings[method] = n_settings.get(method, 0) + 1
    for key, rs in policy.items():
        method, setting = key
        ok = [r for r in rs if r["status"] == "ok"]
        mark = " **(chosen on val)**" if rs[0].get("chosen") and n_settings[method] > 1 else ""
        cells = []
        for c in cols:
            cell = _fmt(stats[key][c])
            cells.append(f"**{cell}**" if best.get(c) == key and cell != "-" else cell)
        for m in paired:
            cells.append(_paired_cell(rs, method, setting, m, per_user, reference))
        shown = ", ".join(f"{k}={v}" for k, v in json.loads(setting).items()) or "-"
        lines.append(f"| {method} | {shown}{mark} | {len(ok)}/{len(rs)} | {' | '.join(cells)} |")
    return lines


def _paired_cell(rs, method, setting, metric, per_user, reference) -> str:
    if method == reference:
        return "0 (reference)"
    pairs = []
    ref_setting = json.dumps({}, sort_keys=True)
    for r in rs:
        mine = per_user.get((method, setting, r["seed"]))
        ref = per_user.get((reference, ref_setting, r["seed"]))
        if mine and ref:
            pairs.append((mine, ref))
    res = paired_bootstrap(pairs, metric)
    if res is None:
        return "-"
    mean, low, high = res
    sig = "" if low <= 0.0 <= high else " *"
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]{sig}"


def _rm_table(rm_rows: list[dict]) -> list[str]:
    cols = [f"test/{m}" for m in RM_METRICS + RM_RANKING_METRICS if any(f"test/{m}" in r for r in rm_rows)]
    lines = ["Reward models: rating regression on the test targets (RMSE, MAE: lower is better; the three mean "
             "predictors for reference), and the ranking metrics of the RM used as a policy (top-10 predicted ratings):", "",
             f"| reward model | seeds | {' | '.join(cols)} |", "|" + "---|" * (2 + len(cols))]
    for method in ("reward_model", "eval_reward_model"):
        rs = [r for r in rm_rows if r["method"] == method]
        if rs:
            ok = [r for r in rs if r["status"] == "ok"]
            cells = [_fmt([r.get(c, math.nan) for r in ok]) for c in cols]
            lines.append(f"| {method} | {len(ok)}/{len(rs)} | {' | '.join(cells)} |")
    return lines


# ----------------------------------------------------------------------------------- the study
def _stages_per_seed(study: Study) -> int:
    n = (0 if study.pretrained else 1) + sum(len(m.settings()) for m in study.methods)
    if study.reward_model:
        n += 2 if study.reward_model.evaluator else 1
    return n


def experiment(config: str = DEFAULT_CONFIG, output_dir: str | None = None, seeds: int | None = None) -> Path:
    """Run the whole study of an experiment config and write its results tables and figures.

    Args:
        config: experiment YAML (``configs/experiments/<name>.yaml``).
        output_dir: where stages and results go (default ``runs/experiments/<name>``).
        seeds: number of seeds (0..N-1); overrides the config's ``seeds``.
    """
    study = load_study(config)
    n_seeds = seeds if seeds is not None else study.seeds
    if n_seeds < 1:
        raise RecpostError(f"--seeds must be >= 1 (got {n_seeds})")
    if study.pretrained and len(study.pretrained) < n_seeds:
        raise RecpostError(f"{config}: pretrained lists {len(study.pretrained)} checkpoints for {n_seeds} seeds; "
                           "give one per seed")
    out = Path(output_dir or f"runs/experiments/{study.name}")
    owner = out / "experiment.json"
    if owner.is_file() and json.loads(owner.read_text()).get("name") != study.name:
        raise RecpostError(f"{out} holds results of another experiment ({owner}); choose another --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    owner.write_text(json.dumps({"name": study.name, "config": str(Path(config).resolve())}, indent=2))
    rows: list[dict] = []
    per_user: dict[tuple, dict] = {}
    base_args = ["--config", str(study.pretrain_config)]
    if study.data_config:
        base_args += ["--config", str(study.data_config)]
    default = study.monitor == "val/ndcg@10" and study.monitor_mode == "max"
    selection = [] if default else [f"--checkpoint.monitor={study.monitor}", f"--checkpoint.mode={study.monitor_mode}"]

    def record(stage: Stage, res: dict) -> None:
        rows.append({"method": stage.method, "setting": stage.setting, "seed": stage.seed, "status": res["status"],
                     **({"error": res["error"]} if "error" in res else {}), **res.get("metrics", {})})
        per_user[(stage.method, json.dumps(stage.setting, sort_keys=True), stage.seed)] = _read_per_user(res.get("per_user"))
        if res.get("metrics_csv"):
            rows[-1]["metrics_csv"] = res["metrics_csv"]

    with Runner(study, out, n_seeds * _stages_per_seed(study)) as runner:
        for seed in range(n_seeds):
            seed_args = [*base_args, "--seed_everything", str(seed)]
            seed_dir = out / f"seed{seed}"
            base_ckpt = str(study.pretrained[seed]) if study.pretrained else None
            base = Stage(seed_dir / "base", [*seed_args, *selection, *study.pretrain_overrides], "base", {}, seed,
                         study.monitor, study.monitor_mode)
            if base_ckpt is None:
                res = runner.run(base, test=False)
                if res["status"] == "failed":
                    record(base, res)
                    continue
                base_ckpt = res["checkpoint"]
            rm_ckpt = eval_ckpt = None
            if study.reward_model:
                spec = study.reward_model
                rm_args = ["--config", str(spec.config), "--model.init_args.init_from", base_ckpt,
                           *(["--trainer.max_epochs", str(spec.epochs)] if spec.epochs else []),
                           *study.posttrain_overrides, *spec.overrides]
                rm_stage = Stage(seed_dir / "reward_model", [*seed_args, *rm_args], "reward_model", {}, seed,
                                 "val/rmse", "min", epochs=spec.epochs)
                res = runner.run(rm_stage)
                record(rm_stage, res)
                rm_ckpt = res.get("checkpoint") if res["status"] == "ok" else None
                if spec.evaluator:
                    ev_stage = Stage(seed_dir / "eval_reward_model", [*base_args, "--seed_everything",
                                     str(seed + EVALUATOR_SEED_OFFSET), *rm_args], "eval_reward_model", {}, seed,
                                     "val/rmse", "min", epochs=spec.epochs)
                    res = runner.run(ev_stage)
                    record(ev_stage, res)
                    eval_ckpt = res.get("checkpoint") if res["status"] == "ok" else None
            test_extra = ["--model.init_args.eval_reward_model", eval_ckpt] if eval_ckpt else []
            if not study.pretrained:
                base.test_args = test_extra
                record(base, runner.run(base))  # reused; re-tested only when the evaluator RM is new
            for method in study.methods:
                for setting in method.settings():
                    tag = "-".join(f"{k}{v}" for k, v in setting.items()) or "default"
                    epochs = method.epochs or study.posttrain_epochs
                    args = [*seed_args, "--config", str(method.config), "--model.init_args.init_from", base_ckpt,
                            "--trainer.max_epochs", str(epochs), *selection, *study.posttrain_overrides,
                            *method.overrides, *[f"--model.init_args.{k}={v}" for k, v in setting.items()]]
                    stage = Stage(seed_dir / method.name / tag, args, method.name, setting, seed, study.monitor,
                                  study.monitor_mode, test_extra, epochs)
                    if method.needs_reward_model:
                        if rm_ckpt is None:
                            res = {"status": "failed", "error": "the reward model stage failed"}
                            record(stage, res)
                            runner.say(f"{stage.label}: failed (no reward model)")
                            continue
                        stage.fit_args += ["--model.init_args.reward_model", rm_ckpt]
                    record(stage, runner.run(stage))
                    write_results(rows, out, study.monitor, study.monitor_mode, per_user)
        write_results(rows, out, study.monitor, study.monitor_mode, per_user)
        _weight_figure(study, out)
        if runner.wandb is not None:
            _log_results_to_wandb(runner, out)
    _say(f"results: {out / 'results.md'}")
    return out


def _weight_figure(study: Study, out: Path) -> None:
    """The ExpSFT weight distribution per lambda of the grid, on this study's training targets."""
    lams = sorted({s["lam"] for m in study.methods for s in m.settings() if "lam" in s})
    if not lams:
        return
    from recpost import figures

    args = ["--config", str(study.pretrain_config)] + (["--config", str(study.data_config)] if study.data_config else [])
    figures.weight_distribution(args, lams, out / "figures" / "exp_sft_weights.png")


def _log_results_to_wandb(runner: Runner, out: Path) -> None:
    """The results table and figures, as one more run of the experiment's W&B group."""
    import wandb

    try:
        run = wandb.init(project=runner.wandb["project"], entity=runner.wandb["entity"], group=runner.wandb["group"],
                         name=f"{runner.study.name}-results", job_type="results", dir=str(out),
                         mode=runner.wandb_mode, reinit="finish_previous")
        rows = json.loads((out / "results.json").read_text())
        cols = sorted({k for r in rows for k in r if k != "metrics_csv"})
        run.log({"results": wandb.Table(columns=cols, data=[[json.dumps(r.get(c)) if isinstance(r.get(c), (dict, list))
                                                             else r.get(c) for c in cols] for r in rows]),
                 **{f"figures/{p.stem}": wandb.Image(str(p)) for p in sorted((out / "figures").glob("*.png"))}})
        run.finish()
    except Exception as exc:  # noqa: BLE001 - the results are written already; W&B trouble must not hide them
        runner.say(f"W&B: could not log the results table ({exc}); the files in {out} are complete")


def _summary(res: dict, monitor: str) -> str:
    m = res.get("metrics", {})
    if "error" in res:
        return res["error"]
    keys = dict.fromkeys((monitor, "val/rmse", "test/ndcg@10", "test/rmse", "test/true_reward@10"))  # ordered, unique
    parts = [f"{k}={m[k]:.4f}" for k in keys if k in m]
    return " ".join(parts) + f" ({res.get('seconds', 0)} s)"


def _say(msg: str) -> None:
    print(msg, flush=True)
