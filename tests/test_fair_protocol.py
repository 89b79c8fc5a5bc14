"""The fair protocol of a study (issue 26): the starting policy is always a candidate for best.ckpt, frequent
validation in optimiser steps, and an equal tuning budget (``trials``) for every method, the learning rate
included; results.json carries ``trials``, ``chosen_step`` and ``val_at_start``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from recpost.cli.callbacks import OPTIMIZER_STEPS, BestCheckpoint, ElapsedTime, ValidationSchedule
from recpost.core.errors import RecpostError
from recpost.data import RecDataModule, Table
from recpost.experiment import build_plan, experiment, load_study
from recpost.experiment.runner import Runner
from recpost.experiment.selection import selection
from recpost.experiment.trials import draw_trials
from recpost.core.runs import LOGS_DIR, VERSION_PREFIX, RunFolder, run_folders
from recpost.methods import SFT
from tests.helpers import build, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MONITOR = "val/ndcg@10"
LR_GRID = "[1.0e-5, 1.0e-4, 5.0e-4, 1.0e-3]"  # YAML: a number needs its dot (1e-5 is text)


# ----------------------------------------------------------------------------------- the starting policy
def _sequential_data(folder: Path, n_users: int = 60, n_items: int = 30, length: int = 10) -> RecDataModule:
    """Every user watches consecutive items (i, i + 1, ...): the next item is learnable, so a trained policy
    validates far above one that a huge learning rate has wrecked."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id,item_id,rating,timestamp"]
    for u in range(n_users):
        lines += [f"u{u},i{(u + t) % n_items + 1},5,{1000 + t}" for t in range(length)]
    (folder / "seq.csv").write_text("\n".join(lines) + "\n")
    return RecDataModule(Table(str(folder / "seq.csv"), name="seq"), max_len=8, batch_size=16,
                         cache_dir=str(folder / "cache"))


def _fit(dm: RecDataModule, module: L.LightningModule, root: Path, epochs: int, *callbacks: L.Callback) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=CSVLogger(str(root)),
                        callbacks=[ElapsedTime(), *callbacks], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    return trainer


def _validations(trainer: L.Trainer) -> list[dict[str, str]]:
    """The validation rows of the fit's metrics.csv, in order."""
    with open(trainer.logger.experiment.metrics_file_path) as fh:
        return [r for r in csv.DictReader(fh) if r.get(MONITOR)]


@pytest.fixture(scope="module")
def trained_start(tmp_path_factory) -> tuple[RecDataModule, Path, Path]:
    """(data, a policy trained on it, a scratch folder): the policy ranks the next item well."""
    folder = tmp_path_factory.mktemp("start")
    dm = _sequential_data(folder)
    dm.prepare_data()
    dm.setup("fit")
    policy = build(SFT, dm, lr=0.01)
    L.Trainer(max_epochs=25, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False).fit(policy, datamodule=dm)
    return dm, save_checkpoint(policy, folder / "start.ckpt"), folder


@pytest.mark.parametrize("at_start", [True, False])
def test_a_fit_that_only_gets_worse_keeps_its_starting_weights(trained_start, tmp_path, at_start):
    dm, start, _ = trained_start
    # lr 1.0 under Adam moves every weight by about 1 per step: each update wrecks the trained policy
    wrecked = build(SFT, dm, lr=1.0, init_from=str(start))
    best = BestCheckpoint(monitor=MONITOR, mode="max", filename="best")
    trainer = _fit(dm, wrecked, tmp_path, 1, best, ValidationSchedule(at_start=at_start, every_n_steps=1))
    rows = _validations(trainer)
    steps = [int(float(r[OPTIMIZER_STEPS])) for r in rows]
    assert steps == ([0] if at_start else []) + list(range(1, trainer.global_step + 1))  # every step, and step 0
    kept = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    picked = selection(trainer.logger.experiment.metrics_file_path, MONITOR)
    if at_start:
        start_value = float(rows[0][MONITOR])
        assert start_value > 0.5 and all(float(r[MONITOR]) < start_value for r in rows[1:])
        assert kept["global_step"] == 0 and float(best.best_model_score) == pytest.approx(start_value)
        assert picked == {"chosen_step": 0, "val_at_start": pytest.approx(start_value)}
    else:  # Lightning's own rule: the least-bad update, however far below the start
        assert kept["global_step"] > 0 and picked["chosen_step"] == kept["global_step"] and picked["val_at_start"] is None


def test_every_n_steps_counts_optimiser_steps_and_validates_the_last_weights(trained_start, tmp_path):
    dm, start, _ = trained_start
    module = build(SFT, dm, lr=1e-3, init_from=str(start))
    trainer = _fit(dm, module, tmp_path, 2, BestCheckpoint(monitor=MONITOR, mode="max", filename="best"),
                   ValidationSchedule(every_n_steps=3))
    steps = [int(float(r[OPTIMIZER_STEPS])) for r in _validations(trainer)]
    total = trainer.global_step
    assert total % 3 != 0  # 2 epochs of 4 batches: the last update is not a multiple of 3
    assert steps == [0, *range(3, total + 1, 3), total]  # at the start (init_from), every 3 steps, after the last


def test_a_method_with_several_steps_per_batch_validates_after_the_batch_that_reaches_the_count(trained_start):
    dm, start, _ = trained_start
    module = build(SFT, dm, init_from=str(start))
    module.optimizer_steps_per_batch = lambda: 4  # as PPO: ppo_epochs x num_minibatches per rollout
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False)
    ValidationSchedule(every_n_steps=6).setup(trainer, module, "fit")
    assert (trainer.val_check_interval, trainer.check_val_every_n_epoch) == (2, None)  # ceil(6 / 4) rollouts
    with pytest.raises(RecpostError, match="replaces trainer.val_check_interval"):
        ValidationSchedule(every_n_steps=6).setup(L.Trainer(val_check_interval=0.5, logger=False), module, "fit")
    with pytest.raises(RecpostError, match=re.escape("validation.every_n_steps must be an integer >= 1 or null (got 0)")):
        ValidationSchedule(every_n_steps=0)


# ----------------------------------------------------------------------------------- trials
def test_the_draw_starts_at_the_defaults_and_spreads_every_key_over_its_range():
    space = {"lr": [1e-6, 1e-5, 1e-4, 5e-4, 1e-3, 1e-2], "beta": [0.05, 0.1, 0.5, 1.0]}
    trials = draw_trials(space, 4, {"lr": 5.0e-4, "beta": 0.1}, seed=0)
    assert trials[0] == {"lr": 0.0005, "beta": 0.1} and len({json.dumps(t) for t in trials}) == 4
    rest = [space["lr"].index(t["lr"]) for t in trials[1:]]  # a Latin hypercube: one lr from each third of the grid
    assert sorted(i // 2 for i in rest) == [0, 1, 2]
    assert draw_trials(space, 4, {"lr": 5.0e-4, "beta": 0.1}, seed=0) == trials  # seeded: the same every time
    assert draw_trials(space, 4, {"lr": 3e-4}, seed=0)[0] != {"lr": 3e-4}  # defaults outside the space: no first
    grid = {"lr": [1e-4, 1e-3], "lam": [0.5, 1.0]}
    assert sorted(map(json.dumps, draw_trials(grid, 4, {}, seed=3))) == sorted(
        json.dumps({"lr": a, "lam": b}) for a in grid["lr"] for b in grid["lam"])  # as many trials as points: all


def _trials_study(tmp_path: Path, tiny_config: Path, methods: str, trials: int = 3) -> Path:
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"""
name: tiny-fair
pretrain_config: {tiny_config}
posttrain_epochs: 1
seeds: 2
wandb: false
trials: {trials}
methods:
{methods}""")
    return cfg


FAIR_METHODS = f"""  sft:
    space: {{lr: {LR_GRID}}}
  exp_sft:
    space: {{lr: {LR_GRID}, lam: [0.5, 1.0, 2.0]}}
"""


def test_every_method_gets_the_same_number_of_trials_with_its_defaults_first(tmp_path, tiny_config):
    study = load_study(str(_trials_study(tmp_path, tiny_config, FAIR_METHODS)))
    assert study.trials == 3
    for method in study.methods:
        settings = method.settings()
        assert len(settings) == 3 and all("lr" in s for s in settings)
        assert settings[0]["lr"] == 5.0e-4  # configs/method/*.yaml's lr: the setting earlier studies ran
    assert next(m for m in study.methods if m.name == "exp_sft").settings()[0]["lam"] == 1.0
    plan = build_plan(study, tmp_path / "out")
    per_seed = {(s.method, s.seed): 0 for s in plan.stages}
    for s in plan.stages:
        per_seed[(s.method, s.seed)] += 1
    assert {n for (m, _), n in per_seed.items() if m != "base"} == {3}


@pytest.mark.parametrize("methods, message", [
    ("  sft:\n    space: {lam: [1.0]}\n", "methods.sft.space has no lr"),
    ("  sft: {}\n", "methods.sft has no space:; with trials: 3 every method is tuned alike"),
    ("  sft:\n    space: {lr: [1.0e-4, 1.0e-3]}\n", "methods.sft.space has 2 settings, fewer than trials: 3"),
    ("  sft:\n    space: {lr: [1e-5, 1.0e-4, 1.0e-3]}\n", "space.lr: '1e-5' is text to YAML, not a number; write it with a dot: 1.0e-05"),
    ("  exp_sft:\n    grid: {lam: [0.5, 1.0, 2.0]}\n", "grid: runs every point, which would give this method another budget"),
    ("  exp_sft:\n    space: {lr: [1.0e-4, 1.0e-3], lamm: [0.5, 1.0]}\n", "ExpSFT has no setting 'lamm'; did you mean lam?"),
    ("  exp_sft:\n    space: {lr: [1.0e-4, 1.0e-3], lam: [0.5, 0]}\n", "model.lam must be > 0"),
])
def test_a_budget_that_is_not_equal_or_leaves_out_the_learning_rate_is_refused(tmp_path, tiny_config, methods, message):
    with pytest.raises(RecpostError, match=re.escape(message)):
        load_study(str(_trials_study(tmp_path, tiny_config, methods)))


def test_a_space_without_trials_is_refused(tmp_path, tiny_config):
    cfg = _trials_study(tmp_path, tiny_config, FAIR_METHODS)
    cfg.write_text(cfg.read_text().replace("trials: 3\n", ""))
    with pytest.raises(RecpostError, match=re.escape("have a space: but the study sets no trials:")):
        load_study(str(cfg))


def test_the_dry_run_shows_each_methods_learning_rate_grid_and_its_trials(tmp_path, tiny_config, capsys):
    experiment(str(_trials_study(tmp_path, tiny_config, FAIR_METHODS)), output_dir=str(tmp_path / "out"), dry_run=True)
    printed = capsys.readouterr().out
    assert "trials: 3 settings per method and seed" in printed
    assert "  sft: lr [1e-05, 0.0001, 0.0005, 0.001] -> lr=0.0005; " in printed
    assert "  exp_sft: lr [1e-05, 0.0001, 0.0005, 0.001] x lam [0.5, 1.0, 2.0] -> lr=0.0005, lam=1.0; " in printed
    assert "--model.init_args.lr=0.0005" in printed and printed.count("recpost fit ") == 2 * (1 + 3 + 3)


# ----------------------------------------------------------------------------------- the rows
def _stand_in_cli(calls: list[list[str]], curves: dict[str, str]):
    """Replaces ``Runner._recpost``: writes what a real run writes, the fit's validations from ``curves`` (stage
    folder name -> metrics.csv text; a default one otherwise)."""

    def run(self, args, log, watch=None, epochs=None, label=""):
        calls.append(list(args))
        root = Path(args[args.index("--trainer.default_root_dir") + 1])
        run = RunFolder(root / LOGS_DIR / f"{VERSION_PREFIX}{len(run_folders(root))}")
        run.checkpoints.mkdir(parents=True)
        if args[0] == "fit":
            run.best_checkpoint.write_text("weights")
            run.metrics_csv.write_text(curves.get(root.parent.name, f"epoch,step,{OPTIMIZER_STEPS},{MONITOR},val/rmse\n"
                                                  f"0,0,0,0.10,0.9\n0,3,4,0.20,0.8\n1,7,8,0.15,0.85\n"))
        else:
            run.metrics_json("test").write_text(json.dumps({"test/ndcg@10": 0.15}))
        return 0

    return run


def test_rows_carry_the_budget_the_chosen_step_and_the_value_at_the_start(tmp_path, tiny_config, monkeypatch):
    calls: list[list[str]] = []
    worse = f"epoch,step,{OPTIMIZER_STEPS},{MONITOR}\n0,0,0,0.30\n0,3,4,0.20\n1,7,8,0.25\n"  # every update hurt
    monkeypatch.setattr(Runner, "_recpost", _stand_in_cli(calls, {"lr0.0005-lam1.0": worse}))
    out = tmp_path / "out"
    experiment(str(_trials_study(tmp_path, tiny_config, FAIR_METHODS)), output_dir=str(out))
    rows = json.loads((out / "results.json").read_text())
    methods = [r for r in rows if r["method"] != "base"]
    assert {(r["method"], r["seed"], r["trials"]) for r in methods} == {
        (m, seed, 3) for m in ("sft", "exp_sft") for seed in (0, 1)}  # equal budgets, per seed
    for r in methods:
        assert r[MONITOR] >= r["val_at_start"]  # the invariant: no chosen checkpoint below its start
    hurt = [r for r in methods if r["setting"] == {"lr": 0.0005, "lam": 1.0}]
    assert [(r["chosen_step"], r["val_at_start"], r[MONITOR]) for r in hurt] == [(0, 0.30, 0.30)] * 2
    helped = next(r for r in methods if r["method"] == "sft")
    assert (helped["chosen_step"], helped["val_at_start"], helped[MONITOR]) == (4, 0.10, 0.20)
    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    assert header.startswith(f"| method | setting | seeds | trials | chosen_step | {MONITOR} | val_at_start |")
    assert re.search(r"\| exp_sft \| lam=1\.0, lr=0\.0005[^|]*\| 2/2 \| 3 \| 0, 0 \| [^|]*0\.3000 [^|]*\| 0\.3000 ", table)
    assert "`chosen_step`: optimiser steps of each seed's chosen checkpoint, 0 when no update beat" in table


# ----------------------------------------------------------------------------------- the presets
PREFERENCE_AND_RL = {"PPO", "DPO", "KTO"}  # method classes that validate every few steps (or quarter epochs)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_tunes_every_method_alike_and_validates_the_preference_methods_often(path):
    from recpost.experiment.regimes import is_regime_map, load_regime_map

    for quick in (False, True):
        if quick and "quick:" not in path.read_text():
            continue
        study = (load_regime_map(str(path), quick=quick).study if is_regime_map(str(path))
                 else load_study(str(path), quick=quick))
        assert study.trials and {len(m.settings()) for m in study.methods} == {study.trials}, study.name
        for method in study.methods:
            assert "lr" in method.space and all("lr" in s for s in method.settings()), method.name
            if "--validation.at_start=false" in method.overrides:  # a run kept unselected on purpose (judges_ml100k)
                assert study.name == "judges_ml100k" and method.name.endswith("_pushed"), (study.name, method.name)
                continue
            often = any(o.startswith(("--validation.every_n_steps=", "--trainer.val_check_interval="))
                        for o in method.overrides)
            assert often == (method.method_class.__name__ in PREFERENCE_AND_RL), (study.name, method.name)


@pytest.mark.slow
def test_the_cli_validates_a_post_training_start_once_and_a_resume_keeps_it(tmp_path, tiny_config):
    """`recpost fit` from init_from validates its start (one step-0 row in metrics.csv), every 3 optimiser steps
    after, and `--ckpt_path last` continues the run without validating its start again."""
    from tests.helpers import pretrained_checkpoint, recpost_cases, tiny_datamodule

    start = pretrained_checkpoint(tiny_datamodule(tmp_path / "data"), tmp_path / "start.ckpt")
    args = ["fit", "--config", str(tiny_config), "--config", str(ROOT / "configs/method/sft.yaml"),
            "--model.init_args.init_from", str(start), "--validation.every_n_steps=3",
            "--trainer.default_root_dir", str(tmp_path / "runs")]
    done = recpost_cases({"first": ([*args, "--trainer.max_epochs=1"], {}),
                          "resumed": ([*args, "--trainer.max_epochs=2", "--ckpt_path", "last"], {})}, cwd=ROOT)
    assert [d.returncode for d in done.values()] == [0, 0], done["resumed"].stderr[-3000:]
    runs = run_folders(tmp_path / "runs")
    assert len(runs) == 1  # the resume continued the run's own folder
    with runs[0].metrics_csv.open() as fh:
        steps = [int(float(r[OPTIMIZER_STEPS])) for r in csv.DictReader(fh) if r.get(MONITOR)]
    assert steps.count(0) == 1 and steps[0] == 0 and steps == sorted(steps) and len(steps) >= 4
    assert "best checkpoint (val/ndcg@10 = " in done["resumed"].stdout


def test_differences_are_to_the_references_setting_chosen_on_validation(tmp_path):
    from recpost.experiment import write_results

    rows = [{"method": "sft", "setting": {"lr": lr}, "seed": 0, "status": "ok", MONITOR: val, "test/ndcg@10": 0.1}
            for lr, val in ((1e-4, 0.10), (5e-4, 0.20))]  # validation prefers lr 5e-4
    rows.append({"method": "exp_sft", "setting": {"lr": 5e-4, "lam": 1.0}, "seed": 0, "status": "ok", MONITOR: 0.2,
                 "test/ndcg@10": 0.1})
    users = range(200)
    per_user = {("sft", json.dumps({"lr": 1e-4}), 0): {u: {"ndcg@10": 0.0} for u in users},
                ("sft", json.dumps({"lr": 5e-4}), 0): {u: {"ndcg@10": 0.3} for u in users},
                ("exp_sft", json.dumps({"lam": 1.0, "lr": 5e-4}, sort_keys=True), 0): {u: {"ndcg@10": 0.5} for u in users}}
    write_results(rows, tmp_path, MONITOR, per_user=per_user)
    saved = {(r["method"], r["setting"]["lr"]): r for r in json.loads((tmp_path / "results.json").read_text())}
    assert saved[("exp_sft", 5e-4)]["intervals"]["test/ndcg@10"]["mean"] == pytest.approx(0.2)  # 0.5 - 0.3, not 0.5
    assert saved[("sft", 1e-4)]["intervals"]["test/ndcg@10"]["mean"] == pytest.approx(-0.3)  # the other lr: compared too
    md = (tmp_path / "results.md").read_text()
    summary, full = [block for block in md.split("\n\n") if block.startswith("|")][:2]
    assert "| sft | lr=0.0005 **(chosen on val)** | 1/1 |" in full and full.count("0 (reference)") == 1
    # the summary first: each method's chosen setting only, the reference once
    assert "| sft | lr=0.0005 | 1/1 |" in summary and "lr=0.0001" not in summary and summary.count("0 (reference)") == 1
    assert len(summary.splitlines()) == 4  # the header, its rule, sft, exp_sft


def test_the_lambda_figure_takes_each_lambda_at_the_learning_rate_validation_prefers():
    from recpost.experiment.figures import _validation_pick

    rows = [{"method": "exp_sft", "setting": {"lr": lr, "lam": 1.0}, "seed": s, "status": "ok", MONITOR: val + s / 100,
             "monitor": MONITOR, "monitor_mode": "max"} for lr, val in ((1e-4, 0.3), (1e-3, 0.1)) for s in (0, 1)]
    assert [r["setting"]["lr"] for r in _validation_pick(rows)] == [1e-4, 1e-4]
    assert _validation_pick(rows[:1]) == rows[:1]  # one setting: as it is
