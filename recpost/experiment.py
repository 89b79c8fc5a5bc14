"""``recpost experiment``: pretrain -> post-train every method over its grid -> test, per seed.

Every stage is a normal ``recpost fit`` / ``recpost test`` run in its own folder under the output
directory, with the exact command in ``stage.json``, so any row can be re-run alone. A stage whose
``stage.json`` says ``ok`` for the same command is reused: an interrupted experiment resumes.

Model selection is on validation only: each run keeps its best ``val/<monitor>`` epoch, and for each
method the setting with the best mean validation metric over seeds is marked ``chosen``. Test
metrics are read once, from the chosen checkpoints and all others alike, never used to choose.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import yaml

from recpost.errors import RecpostError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/experiments/sim.yaml"
TABLE_METRICS = ["ndcg@10", "hr@10", "ndcg@10_liked", "hr@10_liked", "rating@10", "coverage@10", "true_reward@10"]


@dataclass
class MethodSpec:
    """One post-training method of the study: its config file and the grid of its settings."""

    name: str
    config: Path
    grid: dict[str, list] = field(default_factory=dict)

    def settings(self) -> list[dict]:
        if not self.grid:
            return [{}]
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in product(*(self.grid[k] for k in keys))]


@dataclass
class Study:
    name: str
    pretrain_config: Path
    methods: list[MethodSpec]
    seeds: int = 1
    posttrain_epochs: int = 10
    pretrain_overrides: list[str] = field(default_factory=list)
    posttrain_overrides: list[str] = field(default_factory=list)
    monitor: str = "val/ndcg@10"
    monitor_mode: str = "max"


def _resolve(path: str, base: Path) -> Path:
    """A config path as given, else relative to the experiment file, else to the repository."""
    for candidate in (Path(path), base / path, REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise RecpostError(f"config file not found: {path} (looked in ., {base} and {REPO_ROOT})")


def load_study(path: str) -> Study:
    cfg_path = _resolve(path, Path.cwd())
    raw = yaml.safe_load(cfg_path.read_text()) or {}
    base = cfg_path.parent
    known = {"name", "pretrain_config", "methods", "seeds", "posttrain_epochs", "pretrain_overrides",
             "posttrain_overrides", "monitor", "monitor_mode"}
    unknown = set(raw) - known
    if unknown:
        raise RecpostError(f"{cfg_path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    if "pretrain_config" not in raw or not raw.get("methods"):
        raise RecpostError(f"{cfg_path}: needs pretrain_config and at least one entry under methods")
    methods = []
    for name, spec in raw["methods"].items():
        grid = spec.get("grid") or {}
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise RecpostError(f"{cfg_path}: methods.{name}.grid.{key} must be a non-empty list")
        methods.append(MethodSpec(name, _resolve(spec["config"], base), grid))
    return Study(
        name=raw.get("name", cfg_path.stem), pretrain_config=_resolve(raw["pretrain_config"], base), methods=methods,
        seeds=int(raw.get("seeds", 1)), posttrain_epochs=int(raw.get("posttrain_epochs", 10)),
        pretrain_overrides=list(raw.get("pretrain_overrides", [])),
        posttrain_overrides=list(raw.get("posttrain_overrides", [])), monitor=raw.get("monitor", "val/ndcg@10"),
        monitor_mode=_mode(raw.get("monitor_mode", "max"), cfg_path),
    )


def _mode(mode: str, where: Path) -> str:
    if mode not in ("max", "min"):
        raise RecpostError(f"{where}: monitor_mode must be max or min (got {mode!r})")
    return mode


def _recpost(args: list[str], log: Path) -> int:
    with log.open("w") as fh:
        return subprocess.call([sys.executable, "-m", "recpost", *args], stdout=fh, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})


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


def run_stage(stage_dir: Path, fit_args: list[str], monitor: str, mode: str = "max") -> dict:
    """fit + test in ``stage_dir``; reuse a finished stage with the same command."""
    key = _stage_key(fit_args)
    marker = stage_dir / "stage.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == key and done.get("status") == "ok":
            return done
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    fit_root = stage_dir / "fit"
    result = {"key": key, "fit_command": ["recpost", "fit", *fit_args, "--trainer.default_root_dir", str(fit_root)]}
    code = _recpost(result["fit_command"][1:], stage_dir / "fit.log")
    if code != 0:
        result.update(status="failed", error=f"fit exited {code}; see {stage_dir / 'fit.log'}")
    else:
        run = _last_run(fit_root)
        ckpt = run / "checkpoints" / "best.ckpt"
        test_root = stage_dir / "test"
        test_args = ["test", *fit_args, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(test_root)]
        result["test_command"] = ["recpost", *test_args]
        code = _recpost(test_args, stage_dir / "test.log")
        if code != 0:
            result.update(status="failed", error=f"test exited {code}; see {stage_dir / 'test.log'}")
        else:
            test = json.loads((_last_run(test_root) / "test_metrics.json").read_text())
            result.update(status="ok", checkpoint=str(ckpt), metrics={**_best_val(run / "metrics.csv", monitor, mode), **test})
    result["seconds"] = round(time.time() - started, 1)
    marker.write_text(json.dumps(result, indent=2))
    return result


def _fmt(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_results(rows: list[dict], out: Path, monitor: str, mode: str = "max") -> None:
    """results.json / results.csv (one row per method, setting, seed) and results.md (mean ± std)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], json.dumps(r["setting"], sort_keys=True)), []).append(r)
    # choose each method's setting on mean validation metric
    best: dict[str, tuple[float, str]] = {}
    for (method, setting), rs in groups.items():
        vals = [r[monitor] for r in rs if r["status"] == "ok" and monitor in r]
        if vals:
            score = statistics.mean(vals)
            if method not in best or (score > best[method][0] if mode == "max" else score < best[method][0]):
                best[method] = (score, setting)
    for r in rows:
        r["chosen"] = best.get(r["method"], (None, None))[1] == json.dumps(r["setting"], sort_keys=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    keys = sorted({k for r in rows for k in r} - {"method", "setting", "seed", "status", "chosen"})
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "setting", "seed", "status", "chosen", *keys])
        for r in rows:
            w.writerow([r["method"], json.dumps(r["setting"]), r["seed"], r["status"], r["chosen"],
                        *[r.get(k, "") for k in keys]])
    present = [m for m in TABLE_METRICS if any(f"test/{m}" in r for r in rows)]
    cols = [monitor, *[f"test/{m}" for m in present]]
    lines = [f"| method | setting | seeds | {' | '.join(cols)} |", "|" + "---|" * (3 + len(cols))]
    for (method, setting), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        mark = " (chosen on val)" if rs[0]["chosen"] and len(
            [1 for (m, _) in groups if m == method]) > 1 else ""
        cells = [_fmt([r.get(c, math.nan) for r in ok]) for c in cols]
        seeds = f"{len(ok)}/{len(rs)}"
        lines.append(f"| {method} | {setting if setting != '{}' else '-'}{mark} | {seeds} | {' | '.join(cells)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    from recpost.figures import metric_vs_lambda

    for metric in ("test/ndcg@10", "test/ndcg@10_liked", "test/true_reward@10"):
        metric_vs_lambda(rows, metric, out / "figures" / f"{metric.split('/')[1].replace('@', '_at_')}_vs_lambda.png")


def experiment(config: str = DEFAULT_CONFIG, output_dir: str | None = None, seeds: int | None = None) -> Path:
    """Run the whole study of an experiment config and write its results tables.

    Args:
        config: experiment YAML (``configs/experiments/<name>.yaml``).
        output_dir: where stages and results go (default ``runs/experiments/<name>``).
        seeds: number of seeds (0..N-1); overrides the config's ``seeds``.
    """
    study = load_study(config)
    n_seeds = seeds if seeds is not None else study.seeds
    if n_seeds < 1:
        raise RecpostError(f"--seeds must be >= 1 (got {n_seeds})")
    out = Path(output_dir or f"runs/experiments/{study.name}")
    owner = out / "experiment.json"
    if owner.is_file() and json.loads(owner.read_text()).get("name") != study.name:
        raise RecpostError(f"{out} holds results of another experiment ({owner}); choose another --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    owner.write_text(json.dumps({"name": study.name, "config": str(study.pretrain_config)}, indent=2))
    rows: list[dict] = []
    base_args = ["--config", str(study.pretrain_config)]
    default = study.monitor == "val/ndcg@10" and study.monitor_mode == "max"
    selection = [] if default else [f"--checkpoint.monitor={study.monitor}", f"--checkpoint.mode={study.monitor_mode}"]
    for seed in range(n_seeds):
        seed_args = [*base_args, "--seed_everything", str(seed)]
        pre = run_stage(out / f"seed{seed}" / "base", [*seed_args, *selection, *study.pretrain_overrides], study.monitor, study.monitor_mode)
        rows.append({"method": "base", "setting": {}, "seed": seed, "status": pre["status"], **pre.get("metrics", {})})
        _say(f"seed {seed} base: {pre['status']} {_summary(pre, study.monitor)}")
        if pre["status"] != "ok":
            continue
        for method in study.methods:
            for setting in method.settings():
                tag = "-".join(f"{k}{v}" for k, v in setting.items()) or "default"
                args = [*seed_args, "--config", str(method.config), "--model.init_args.init_from", pre["checkpoint"],
                        "--trainer.max_epochs", str(study.posttrain_epochs), *selection, *study.posttrain_overrides,
                        *[f"--model.init_args.{k}={v}" for k, v in setting.items()]]
                res = run_stage(out / f"seed{seed}" / method.name / tag, args, study.monitor, study.monitor_mode)
                rows.append({"method": method.name, "setting": setting, "seed": seed, "status": res["status"],
                             **res.get("metrics", {})})
                _say(f"seed {seed} {method.name} {tag}: {res['status']} {_summary(res, study.monitor)}")
                write_results(rows, out, study.monitor, study.monitor_mode)
    write_results(rows, out, study.monitor, study.monitor_mode)
    _say(f"results: {out / 'results.md'}")
    return out


def _summary(res: dict, monitor: str) -> str:
    m = res.get("metrics", {})
    return f"{monitor}={m.get(monitor, float('nan')):.4f} test/ndcg@10={m.get('test/ndcg@10', float('nan')):.4f} ({res.get('seconds', 0)} s)"


def _say(msg: str) -> None:
    print(msg, flush=True)
