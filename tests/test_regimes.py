"""The regime map (`recpost experiment` on a config with `worlds:`): its worlds, their one-line errors, the
dry run, running each world as a study, the table across worlds, and the oracle selection in the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recpost.data import RecDataModule
from recpost.core.errors import RecpostError
from recpost.experiment import experiment, load_regime_map, write_regime_results, write_results
from recpost.experiment.regime_report import world_cells
from recpost.experiment.regimes import WORLD_CONFIG
from recpost.experiment.runner import Runner
from recpost.core.runs import LOGS_DIR, VERSION_PREFIX, RunFolder, run_folders

ROOT = Path(__file__).resolve().parents[1]

# A tiny simulated world and SFT on it: the pretrain config of the regime maps below.
TINY_SIM = """
seed_everything: 0
data:
  source:
    class_path: recpost.data.Simulator
    init_args:
      min_seq_len: 5
      max_seq_len: 10
      world: {{n_users: 60, n_items: 40, latent_dim: 4, slate_size: 0}}
  max_len: 8
  batch_size: 32
  eval_batch_size: 64
model:
  class_path: recpost.methods.SFT
  init_args:
    backbone: {{d_model: 16, n_layers: 1, n_heads: 2, dropout: 0.1}}
    lr: 0.01
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  enable_progress_bar: false
  default_root_dir: {root}
"""


def _regime_map(tmp_path: Path, worlds: str, methods: str = "  sft: {}\n  exp_sft:\n    grid:\n      lam: [0.5, 2.0]\n",
                extra: str = "") -> Path:
    pretrain = tmp_path / "tiny_sim.yaml"
    pretrain.write_text(TINY_SIM.format(root=tmp_path / "runs"))
    cfg = tmp_path / "regimes.yaml"
    cfg.write_text(f"name: tiny_regimes\npretrain_config: {pretrain}\nposttrain_epochs: 1\nwandb: false\n"
                   f"methods:\n{methods}worlds:\n{worlds}{extra}")
    return cfg


GRID = "  grid:\n    noise_std: [0.25, 1.0]\n    n_items: [30, 40]\n  extra:\n    placebo: {shuffle_ratings: true}\n"


# ----------------------------------------------------------------------------------- the worlds
def test_the_grid_expands_to_every_combination_then_the_extra_worlds(tmp_path):
    regimes = load_regime_map(str(_regime_map(tmp_path, GRID)))
    assert [(w.name, w.settings, w.on_grid) for w in regimes.worlds] == [
        ("noise_std0.25-n_items30", {"noise_std": 0.25, "n_items": 30}, True),
        ("noise_std0.25-n_items40", {"noise_std": 0.25, "n_items": 40}, True),
        ("noise_std1.0-n_items30", {"noise_std": 1.0, "n_items": 30}, True),
        ("noise_std1.0-n_items40", {"noise_std": 1.0, "n_items": 40}, True),
        ("placebo", {"shuffle_ratings": True}, False)]
    assert regimes.heatmap == ("noise_std", "n_items")  # the first two axes with several values


def test_each_world_is_the_study_with_its_world_config_composed_last_in_every_stage(tmp_path):
    regimes = load_regime_map(str(_regime_map(tmp_path, GRID)))
    out = tmp_path / "out"
    plans = regimes.plans(out)
    world, plan = regimes.worlds[2], plans[2]
    config = out / world.name / WORLD_CONFIG
    assert plan.out == out / world.name and plan.study.base_configs[-1] == config.resolve()
    for stage in plan.stages:
        args = [str(a) for a in stage.fit_args]
        assert args[args.index(str(config.resolve())) - 1] == "--config"
    from recpost.experiment import write_world_config

    write_world_config(plan.study, world)
    source = RecDataModule.from_configs(plan.study.base_configs).source  # as recpost fit composes them
    assert (source.world.config.noise_std, source.world.config.n_items, source.world.config.n_users) == (1.0, 30, 60)


@pytest.mark.parametrize("worlds, message", [
    ("  grid:\n    noise: [0.5]\n", "worlds.grid.noise: the simulator has no world setting 'noise' (did you mean "
                                     "noise_std?); allowed: n_users, n_items, latent_dim"),
    ("  extra:\n    odd: {placebo: true}\n", "worlds.extra.odd.placebo: the simulator has no world setting 'placebo'"),
    ("  grid:\n    noise_std: [0.5, -1.0]\n", "worlds: world noise_std-1.0: simulator noise_std must be >= 0"),
    ("  grid:\n    noise_std: []\n", "worlds.grid.noise_std must be a non-empty list"),
    ("  grid:\n    noise_std: [0.5]\n  heatmap: [noise_std, n_items]\n", "worlds.heatmap must name two different grid axes"),
    ("  extra:\n    figures: {noise_std: 0.1}\n", "world name 'figures' cannot be a folder name here"),
    ("  axes:\n    noise_std: [0.5]\n", "worlds: unknown keys ['axes']; allowed: ['extra', 'grid', 'heatmap']"),
])
def test_a_bad_world_is_one_line_naming_what_is_wrong(tmp_path, worlds, message):
    with pytest.raises(RecpostError, match=re.escape(message)) as caught:
        load_regime_map(str(_regime_map(tmp_path, worlds)))
    assert "\n" not in str(caught.value)


def test_a_regime_map_without_sft_the_reference_of_every_difference_is_refused(tmp_path):
    cfg = _regime_map(tmp_path, GRID, methods="  exp_sft: {}\n")
    with pytest.raises(RecpostError, match=re.escape("a regime map gives each method's gain over sft in every world; "
                                                     "add sft to its methods")):
        load_regime_map(str(cfg))


def test_worlds_on_data_other_than_the_simulators_are_refused(tmp_path, tiny_config):
    cfg = tmp_path / "regimes.yaml"
    cfg.write_text(f"name: x\npretrain_config: {tiny_config}\nmethods:\n  sft: {{}}\nworlds:\n{GRID}")
    with pytest.raises(RecpostError, match=re.escape("the study's data source is recpost.data.Table; use the "
                                                     "simulator's data")):
        load_regime_map(str(cfg))


def test_quick_replaces_the_worlds_and_the_shipped_map_keeps_every_method_and_the_placebo():
    full = load_regime_map(str(ROOT / "configs/experiments/sim_regimes.yaml"))
    quick = load_regime_map(str(ROOT / "configs/experiments/sim_regimes.yaml"), quick=True)
    methods = ["sft", "exp_sft", "filtered_bc", "linear_sft", "asft", "ppo", "online_dpo", "dpo"]
    assert [m.name for m in full.study.methods] == [m.name for m in quick.study.methods] == methods
    assert (len(full.worlds), len(quick.worlds)) == (28, 5) and quick.name == "sim_regimes_quick"
    assert full.worlds[-1].settings == quick.worlds[-1].settings == {"shuffle_ratings": True}
    assert quick.heatmap == ("noise_std", "exposure_concentration") and quick.study.seeds == 1


def test_dry_run_lists_every_worlds_stages_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    experiment(str(_regime_map(tmp_path, GRID)), output_dir=str(out), dry_run=True)
    printed = capsys.readouterr().out
    assert not out.exists()
    assert printed.startswith("regime map tiny_regimes: 5 worlds (noise_std: 0.25, 1.0; n_items: 30, 40; plus placebo), "
                              "20 stages in all")
    for i, name in enumerate(["noise_std0.25-n_items30", "noise_std0.25-n_items40", "noise_std1.0-n_items30",
                              "noise_std1.0-n_items40", "placebo"], 1):
        assert f"=== world {i}/5: {name} (" in printed
        assert printed.count(f"--config {(out / name / WORLD_CONFIG).resolve()}") == 4 * 2  # base, sft, 2 exp_sft
    assert printed.count("  recpost fit ") == printed.count("  recpost test ") == 20


# ----------------------------------------------------------------------------------- running it
def _stand_in_cli(calls: list[list[str]]):
    """Replaces ``Runner._recpost``: records the command and writes the files a real run writes, with a
    validation and test true reward that grow with lambda (ndcg the other way round)."""

    def run(self, args, log, watch=None, epochs=None, label=""):
        calls.append(list(args))
        root = Path(args[args.index("--trainer.default_root_dir") + 1])
        lam = next((float(a.split("=")[1]) for a in args if a.startswith("--model.init_args.lam=")), 0.0)
        run = RunFolder(root / LOGS_DIR / f"{VERSION_PREFIX}{len(run_folders(root))}")
        run.checkpoints.mkdir(parents=True)
        if args[0] == "fit":
            run.best_checkpoint.write_text("weights")
            run.metrics_csv.write_text(f"epoch,step,val/ndcg@10,val/true_reward@10\n0,1,{0.3 - 0.1 * lam},{3 + lam}\n")
        else:
            run.metrics_json("test").write_text(json.dumps({"test/ndcg@10": 0.2, "test/true_reward@10": 3 + lam,
                                                            "test/true_reward_sampled": 2 + lam / 2}))
        return 0

    return run


def test_each_world_runs_as_a_study_in_its_folder_then_the_map_is_tabulated_and_reused(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(Runner, "_recpost", _stand_in_cli(calls))
    worlds = "  grid:\n    noise_std: [0.25, 1.0]\n  extra:\n    placebo: {shuffle_ratings: true}\n"
    out = experiment(str(_regime_map(tmp_path, worlds)), output_dir=str(tmp_path / "out"))
    for name, setting in (("noise_std0.25", {"noise_std": 0.25}), ("placebo", {"shuffle_ratings": True})):
        assert (out / name / WORLD_CONFIG).read_text().endswith(
            "data:\n  source:\n    init_args:\n      world:\n        " + "".join(f"{k}: {str(v).lower()}\n"
                                                                             for k, v in setting.items()))
        assert {r["status"] for r in json.loads((out / name / "results.json").read_text())} == {"ok"}
    fits = [c for c in calls if c[0] == "fit"]
    assert len(fits) == 3 * 4  # base, sft and ExpSFT at 2 lambdas in each world, each composing its world's config
    for fit in fits:
        world = Path(fit[fit.index("--trainer.default_root_dir") + 1]).relative_to(out).parts[0]
        assert str((out / world / WORLD_CONFIG).resolve()) in fit
    summary = json.loads((out / "regimes.json").read_text())
    assert all(w["has_results"] for w in summary["worlds"])
    offline = {(r["world"], r["method"]): r for r in summary["rows"] if r["selection"] == "offline"}
    assert offline[("placebo", "exp_sft")]["setting"] == {"lam": 0.5}  # ndcg prefers the small lambda
    assert offline[("placebo", "exp_sft")]["delta"]["test/true_reward@10"] == pytest.approx(0.5)
    assert "| placebo | - | True | " in (out / "regimes.md").read_text()
    calls.clear()
    experiment(str(_regime_map(tmp_path, worlds)), output_dir=str(tmp_path / "out"))
    assert calls == []  # every stage of every world reused


# ----------------------------------------------------------------------------------- tables and the oracle
def _rows(val_ndcg: dict, val_true: dict, test_true: dict, sampled: dict, sft: float = 3.0) -> list[dict]:
    """results.json rows of one seed: SFT and ExpSFT at the lambdas of the dicts' keys."""
    rows = [{"method": "sft", "setting": {}, "seed": 0, "status": "ok", "val/ndcg@10": 0.1, "val/true_reward@10": sft,
             "test/true_reward@10": sft, "test/true_reward_sampled": sft - 1}]
    return rows + [{"method": "exp_sft", "setting": {"lam": lam}, "seed": 0, "status": "ok", "val/ndcg@10": val_ndcg[lam],
                    "val/true_reward@10": val_true[lam], "test/true_reward@10": test_true[lam],
                    "test/true_reward_sampled": sampled[lam]} for lam in val_ndcg]


def test_the_oracle_picks_the_best_validation_true_reward_even_where_ndcg_picks_another(tmp_path):
    rows = _rows(val_ndcg={0.5: 0.2, 2.0: 0.1}, val_true={0.5: 3.1, 2.0: 3.5}, test_true={0.5: 3.2, 2.0: 3.6},
                 sampled={0.5: 2.1, 2.0: 2.4})
    write_results(rows, tmp_path, "val/ndcg@10")
    saved = {(r["method"], r["setting"].get("lam")): r for r in json.loads((tmp_path / "results.json").read_text())}
    assert saved[("exp_sft", 0.5)]["chosen"] and not saved[("exp_sft", 0.5)]["oracle_chosen"]
    assert saved[("exp_sft", 2.0)]["oracle_chosen"] and not saved[("exp_sft", 2.0)]["chosen"]
    md = (tmp_path / "results.md").read_text()
    assert "Oracle selection (val/true_reward@10, the simulator's true reward of the validation top 10) — not available " \
           "offline" in md
    assert "| exp_sft | lam=0.5 | lam=2.0 | 3.2000 | 3.6000 | +0.4000 | 2.1000 | 2.4000 | +0.3000 |" in md
    assert "| sft | - | - | 3.0000 | 3.0000 | +0.0000 |" in md


def test_without_the_true_reward_there_is_no_oracle_choice(tmp_path):
    rows = [{k: v for k, v in r.items() if "true_reward" not in k}
            for r in _rows({0.5: 0.2}, {0.5: 3.0}, {0.5: 3.0}, {0.5: 2.0})]
    write_results(rows, tmp_path, "val/ndcg@10")
    assert all("oracle_chosen" not in r for r in json.loads((tmp_path / "results.json").read_text()))
    assert "Oracle selection" not in (tmp_path / "results.md").read_text()


def test_differences_to_sft_are_taken_at_each_selections_setting_and_seed():
    rows = []
    for seed, sft in ((0, 3.0), (1, 3.2)):
        for r in _rows({0.5: 0.2, 2.0: 0.1}, {0.5: 3.1, 2.0: 3.5}, {0.5: sft + 0.1, 2.0: sft + 0.5},
                       {0.5: sft - 0.8, 2.0: sft - 0.5}, sft=sft):
            rows.append({**r, "seed": seed, "chosen": r["setting"].get("lam") in (None, 0.5),
                         "oracle_chosen": r["setting"].get("lam") in (None, 2.0)})
    offline, oracle = world_cells(rows, "chosen"), world_cells(rows, "oracle_chosen")
    assert offline["sft"]["delta"]["test/true_reward@10"] == 0.0 and offline["sft"]["value"]["test/true_reward@10"] == \
        pytest.approx(3.1)
    assert offline["exp_sft"]["setting"] == {"lam": 0.5} and offline["exp_sft"]["seeds"] == 2
    assert offline["exp_sft"]["delta"] == pytest.approx({"test/true_reward@10": 0.1, "test/true_reward_sampled": 0.2})
    assert oracle["exp_sft"]["delta"] == pytest.approx({"test/true_reward@10": 0.5, "test/true_reward_sampled": 0.5})


def test_the_map_table_gives_each_worlds_differences_and_the_cost_of_choosing_offline(tmp_path):
    regimes = load_regime_map(str(_regime_map(tmp_path, "  grid:\n    noise_std: [0.25, 1.0]\n    n_items: [30, 40]\n")))
    out = tmp_path / "out"
    gains = {"noise_std0.25-n_items30": 0.1, "noise_std0.25-n_items40": 0.2, "noise_std1.0-n_items30": 0.3}
    for world, gain in gains.items():  # the fourth world has not finished
        (out / world).mkdir(parents=True)
        rows = _rows({0.5: 0.2, 2.0: 0.1}, {0.5: 3.1, 2.0: 3.5}, {0.5: 3.0 + gain, 2.0: 3.0 + 2 * gain},
                     {0.5: 2.0 + gain, 2.0: 2.0})
        write_results(rows, out / world, "val/ndcg@10")
    write_regime_results(regimes, out)
    md = (out / "regimes.md").read_text()
    assert "3 of 4 worlds have results" in md
    table = md.split("## Δ test/true_reward@10 vs sft, setting chosen on val/ndcg@10")[1]
    assert "| noise_std0.25-n_items40 | 0.25 | 40 | 3.0000 | +0.2000 (lam=0.5) |" in table
    assert "| noise_std1.0-n_items40 | 1.0 | 40 | - | - |" in table
    oracle = md.split("## Δ test/true_reward@10 vs sft, setting chosen on val/true_reward@10 (oracle")[1]
    assert "| noise_std1.0-n_items30 | 1.0 | 30 | 3.0000 | +0.6000 (lam=2.0) |" in oracle
    cost = md.split("## What choosing on val/ndcg@10 costs")[1]
    assert "| exp_sft | +0.2000 | -0.2000 |" in cost  # oracle gains 2g - g on top, loses g on sampled; mean g = 0.2
    figure = out / "figures" / "exp_sft_delta_true_reward_at_10.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "figures" / "sft_delta_true_reward_at_10.png").exists()
