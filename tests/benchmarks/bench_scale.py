"""Every stage at the ML-20M and Amazon Books shapes, and the paper study's projected time (docs/scale/costs.md).

    python -m tests.benchmarks.bench_scale --shape ml20m --root /tmp/scale          # measure, then project
    python -m tests.benchmarks.bench_scale --shape books --figures /tmp/scale/books.json  # project a finished run
    RECPOST_SCALE_SHAPES=ml20m,books pytest -m benchmark -s tests/benchmarks/bench_scale.py

The measuring is ``recpost bench --dataset synthetic`` (``recpost/bench/scale.py``); this adds what only the
experiment layer knows: the study's stages (``recpost.experiment.build_plan`` of the shipped paper preset, one
row per fit: the base, the reward model, its ensemble members and judges, every method's grid point, per seed)
and each stage's epochs. A stage costs ``epochs x (epoch + one validation)`` plus its tests (a policy: one over
the ``eval_min_rating`` users and one over every target; a reward model: one over every target). Pretraining
(``base``) is counted at its config's ``max_epochs`` (early stopping usually ends it sooner: an upper bound).
Reward models and judges validate at the SFT policy's measured rate (their own ranking evaluation scores the
same catalog the same way). Printed as ``study/...: value`` lines, in hours: ``cpu_hours`` (one core's CPU
time, measured per step), ``wall_hours_shared`` (this shared machine's wall time as measured) and
``gpu_hours_projected`` (the counted FLOPs at the assumed GPU rate of ``recpost.bench.scale``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import yaml

from recpost.bench.scale import project, scale_bench
from recpost.bench.shipped import CONFIGS, SHIPPED
from recpost.experiment import build_plan
from recpost.experiment.study import load_study

REWARD_MODELS = {"reward_model", "eval_reward_model", "reward_ensemble", "judge"}
CLOCKS = {"cpu_hours": ("epoch_cpu_seconds", "cpu_seconds"), "wall_hours_shared": ("epoch_seconds", "seconds"),
          "gpu_hours_projected": ("gpu_epoch_seconds", "gpu_")}


def _validation(projected: dict[str, float], clock: str, users: str) -> float:
    """One validation by the study's policy (``users``: ``validation`` or ``validation_all_users``) on ``clock``."""
    kind = CLOCKS[clock][1]
    key = f"projected/gpu_{users}_seconds/sft" if kind == "gpu_" else f"projected/{users}_{kind}/sft"
    return projected.get(key, float("nan"))


def study_projection(shape: str, figures: dict[str, float], quick: bool = False) -> dict[str, float]:
    """Hours of the whole paper study of ``shape`` on each clock, from a finished ``scale_bench``'s figures."""
    pretrain, study_config = SHIPPED[shape]
    study = load_study(str(CONFIGS / study_config), quick=quick)
    plan = build_plan(study, Path("/nonexistent"))
    max_epochs = (yaml.safe_load((CONFIGS / pretrain).read_text()).get("trainer") or {}).get("max_epochs", 1)
    projected = {**figures, **project(figures)}
    out: dict[str, float] = {"study/stages": float(len(plan.stages)), "study/seeds": float(plan.seeds)}
    for clock, (epoch_key, _) in CLOCKS.items():
        total = 0.0
        for stage in plan.stages:
            is_rm = stage.method in REWARD_MODELS
            method = stage.method
            if is_rm:  # measured under its config's name (the judges may be another model than the study's RM)
                method = (study.judges if stage.method == "judge" else study.reward_model).config.stem
            epochs = stage.epochs or (max_epochs if stage.method == "base" else study.posttrain_epochs)
            epoch = projected.get(f"projected/{epoch_key}/{method}", float("nan"))
            every = _validation(projected, clock, "validation_all_users")
            validation = every if is_rm else _validation(projected, clock, "validation")
            tests = every if is_rm else validation + every
            total += epochs * (epoch + validation) + tests
        out[f"study/{clock}"] = total / 3600
    return out


def run(shape: str, root: str | None, figures_path: str | None, quick: bool = False) -> dict[str, float]:
    if figures_path:
        figures = json.loads(Path(figures_path).read_text())["figures"]
    else:
        figures = scale_bench(shape, root, output=str(Path(root) / f"{shape}.json"))
    out = study_projection(shape, figures, quick)
    for name, value in {**project(figures), **out}.items():
        print(f"{name}: {value:.6g}", flush=True)
    return out


@pytest.mark.benchmark
@pytest.mark.parametrize("shape", [s for s in os.environ.get("RECPOST_SCALE_SHAPES", "ml20m").split(",") if s])
def test_bench_scale(shape, tmp_path):
    root = os.environ.get("RECPOST_SCALE_ROOT", str(tmp_path))
    assert run(shape, root, None)["study/cpu_hours"] > 0


def table(paths: list[str]) -> str:
    """The stage-cost table of docs/scale/costs.md from finished runs' JSON (one column group per shape)."""
    runs = {Path(p).stem: json.loads(Path(p).read_text()) for p in paths}
    methods = []
    for run_ in runs.values():
        methods += [k.split("/")[1] for k in run_["figures"] if k.startswith("step/") and k.endswith("/step_seconds")
                    and k.split("/")[1] not in methods]
    head = "| stage | " + " | ".join(f"{s}: CPU s | {s}: wall s | {s}: targets / CPU s | {s}: GFLOP | {s}: peak GiB"
                                        for s in runs) + " |"
    lines = [head, "|---" * (1 + 5 * len(runs)) + "|"]

    def cells(run_, prefix, cpu, wall, per, flops):
        f, errors = run_["figures"], run_.get("errors", {})
        if f"{prefix}/failed" in f:
            return ["failed: " + errors.get(prefix, "?").replace("|", "/")[:60], "", "", "", ""]
        get = lambda key: f.get(f"{prefix}/{key}")  # noqa: E731
        if get(cpu) is None:
            return ["", "", "", "", ""]
        rate = f"{get(per) / get(cpu):,.0f}" if per and get(per) else ""
        gflop = f"{get(flops) / 1e9:,.1f}" if flops and get(flops) else ""
        return [f"{get(cpu):,.1f}", f"{get(wall):,.1f}", rate, gflop, f"{get('peak_mib') / 1024:.2f}"]

    rows = [("preprocessing (cold cache)", "preprocess", "preprocess_cpu_seconds", "preprocess_seconds", None, None)]
    rows += [(f"step: {m}", f"step/{m}", "step_cpu_seconds", "step_seconds", "targets_per_step", "step_flops")
             for m in methods]
    rows += [(f"validation, {m} (per {{users}} users)", f"eval/{m}", "eval_cpu_seconds", "eval_seconds", "eval_users",
              None) for m in ("pretrain", "sft")]
    for label, prefix, cpu, wall, per, flops in rows:
        out = [c for run_ in runs.values() for c in cells(run_, prefix, cpu, wall, per, flops)]
        users = next((int(r["figures"][f"{prefix}/eval_users"]) for r in runs.values()
                      if f"{prefix}/eval_users" in r["figures"]), 0)
        lines.append(f"| {label.format(users=users)} | " + " | ".join(out) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHIPPED))
    parser.add_argument("--root", help="data root for the synthetic files (measure)")
    parser.add_argument("--figures", help="the JSON of a finished run (project only)")
    parser.add_argument("--quick", action="store_true", help="the study's --quick variant")
    parser.add_argument("--table", nargs="+", help="print docs/scale/costs.md's stage table from these runs' JSON")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
    else:
        run(args.shape, args.root, args.figures, args.quick)
