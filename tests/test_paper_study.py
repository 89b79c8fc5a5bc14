"""The paper's study in `recpost experiment`: judges, reward ensembles, the >= 4.5 protocol with a second
test over every target, the new methods as rows, --quick, and the paper_* presets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from recpost.core.errors import RecpostError
from recpost.experiment import build_plan, experiment, load_study, write_results
from recpost.experiment.plan import ALL_TARGETS, CheckpointOf, CheckpointsOf, resolve
from recpost.experiment.roles import ENSEMBLE_SEED_OFFSET, JUDGE_SEED_OFFSET, role_seed
from recpost.experiment.runner import Runner
from recpost.core.runs import LOGS_DIR, VERSION_PREFIX, RunFolder, run_folders

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"paper_ml1m": 30, "paper_ml20m": 12, "paper_amazon_books": 10, "paper_ml100k": 30}
PAPER_METHODS = {"sft", "exp_sft", "linear_sft", "asft", "ppo", "dpo", "online_dpo", "rs_dpo"}
# The fair protocol's controls beside them (issue 26): RM-free offline methods and GRPO.
CONTROLS = {"filtered_bc", "kto", "dpo_logged", "grpo"}
# The preference and RL methods, validated every few steps in the presets.
OFTEN_VALIDATED = {"kto", "dpo_logged", "ppo", "grpo", "dpo", "online_dpo", "rs_dpo"}


def _paper_study(tmp_path: Path, tiny_config: Path, extra: str = "", seeds: int = 1) -> Path:
    """Every method of the paper, 3 judges, RS-DPO on a 3-model ensemble, the >= 4.5 protocol."""
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"""
name: tiny-paper
pretrain_config: {tiny_config}
posttrain_epochs: 1
seeds: {seeds}
wandb: false
eval_min_rating: 4.5
reward_model:
  config: {ROOT / 'configs/method/reward_model.yaml'}
  epochs: 1
judges: {{count: 3}}
methods:
  sft: {{}}
  exp_sft:
    grid:
      lam: [0.5, 1.0]
  linear_sft: {{}}
  asft: {{}}
  ppo: {{}}
  dpo: {{}}
  online_dpo: {{}}
  rs_dpo:
    reward_ensemble: {{count: 3}}
{extra}""")
    return cfg


def _arg(args, flag: str) -> str:
    return args[list(args).index(flag) + 1]


# ----------------------------------------------------------------------------------- the plan
def test_judges_are_trained_on_their_own_seeds_and_bootstrap_resamples(tmp_path, tiny_config):
    plan = build_plan(load_study(str(_paper_study(tmp_path, tiny_config))), tmp_path / "out", seeds=2)
    stage = {s.name: s for s in plan.stages}
    names = [s.name for s in plan.stages if s.seed == 1]
    assert names[:7] == ["seed1/reward_model", "seed1/reward_ensemble/member1", "seed1/reward_ensemble/member2",
                         "seed1/judge/judge0", "seed1/judge/judge1", "seed1/judge/judge2", "seed1/base"]
    training = [stage[n] for n in names[:3]]  # the RMs a method trains against: seeds, no resample
    judges = [stage[n] for n in names[3:6]]
    training_seeds = {int(_arg(s.fit_args, "--seed_everything")) for s in training}
    judge_seeds = [int(_arg(j.fit_args, "--seed_everything")) for j in judges]
    assert training_seeds == {1, 1 + ENSEMBLE_SEED_OFFSET, 1 + ENSEMBLE_SEED_OFFSET + 1000}
    assert judge_seeds == [role_seed(1, "judge", k) for k in range(3)] == [1 + JUDGE_SEED_OFFSET + 1000 * k for k in range(3)]
    assert not training_seeds & set(judge_seeds)
    # every seed's reward models have distinct seeds, across study seeds too
    all_seeds = [int(_arg(s.fit_args, "--seed_everything")) for s in plan.stages
                 if s.method in ("reward_model", "reward_ensemble", "judge")]
    assert len(all_seeds) == len(set(all_seeds)) == 2 * 6
    for judge, seed in zip(judges, judge_seeds):  # each judge on its own bootstrap resample of the users
        assert "--data.train_users=bootstrap" in judge.fit_args and f"--data.train_users_seed={seed}" in judge.fit_args
        assert (judge.monitor, judge.mode, judge.method) == ("val/rmse", "min", "judge")
    assert not any("bootstrap" in str(a) for a in training[0].fit_args)  # the study's RM: every user
    for member, seed in zip(training[1:], (1 + ENSEMBLE_SEED_OFFSET, 1 + ENSEMBLE_SEED_OFFSET + 1000)):  # RS-DPO's others
        assert "--data.train_users=bootstrap" in member.fit_args and f"--data.train_users_seed={seed}" in member.fit_args
    # the judges are continued from the base model, like the reward model
    assert all(CheckpointOf("--model.init_args.init_from", "seed1/base") in j.fit_args for j in judges)


def test_every_policy_is_validated_and_tested_by_the_judges_and_rs_dpo_trains_on_the_ensemble(tmp_path, tiny_config):
    plan = build_plan(load_study(str(_paper_study(tmp_path, tiny_config))), tmp_path / "out")
    stage = {s.name: s for s in plan.stages}
    judging = CheckpointsOf("--model.init_args.judges", ("seed0/judge/judge0", "seed0/judge/judge1", "seed0/judge/judge2"),
                            required=False)
    policies = [s for s in plan.stages if s.method not in ("reward_model", "reward_ensemble", "judge")]
    assert [s.name for s in policies] == ["seed0/base", "seed0/sft/default", "seed0/exp_sft/lam0.5", "seed0/exp_sft/lam1.0",
                                          "seed0/linear_sft/default", "seed0/asft/default", "seed0/ppo/default",
                                          "seed0/dpo/default", "seed0/online_dpo/default", "seed0/rs_dpo/default"]
    assert judging in stage["seed0/base"].test_args  # the base is fitted before the judges: they only test it
    assert all(judging in s.fit_args for s in policies[1:])  # validation curves and test of every method
    rs_dpo = stage["seed0/rs_dpo/default"]
    ensemble = CheckpointsOf("--model.init_args.reward_ensemble",
                             ("seed0/reward_model", "seed0/reward_ensemble/member1", "seed0/reward_ensemble/member2"))
    assert ensemble in rs_dpo.fit_args
    assert CheckpointOf("--model.init_args.reward_model", "seed0/reward_model", required=False) in rs_dpo.fit_args
    assert not any(isinstance(a, CheckpointsOf) and "reward_ensemble" in a.flag for s in policies[:-1] for a in s.fit_args)
    # the new methods take the study's RM as their class says: ASFT needs it, LinearSFT takes none
    assert CheckpointOf("--model.init_args.reward_model", "seed0/reward_model") in stage["seed0/asft/default"].fit_args
    assert CheckpointOf("--model.init_args.reward_model", "seed0/reward_model") in stage["seed0/online_dpo/default"].fit_args
    assert not any("reward_model" in str(a) for a in stage["seed0/linear_sft/default"].fit_args)


def test_the_protocol_applies_to_the_policies_with_a_second_test_over_every_target(tmp_path, tiny_config):
    plan = build_plan(load_study(str(_paper_study(tmp_path, tiny_config))), tmp_path / "out")
    for s in plan.stages:
        policy = s.method not in ("reward_model", "reward_ensemble", "judge")
        assert ("--data.eval_min_rating=4.5" in s.fit_args) == policy == s.all_targets  # RMs: selected on every target
        assert len(s.commands) == (3 if policy else 2)
    sft = plan.stage("seed0/sft/default")
    test_all = list(sft.test_all_command)
    assert test_all[-4:] == [ALL_TARGETS, CheckpointOf("--ckpt_path", "seed0/sft/default"), "--trainer.default_root_dir",
                             str(sft.directory / "test_all")]
    assert test_all.index(ALL_TARGETS) > test_all.index("--data.eval_min_rating=4.5")  # the later flag wins
    assert test_all[:-4] == list(sft.test_command)[:-3]  # otherwise the same test of the same checkpoint


def test_list_placeholders_resolve_to_a_yaml_list_and_optional_members_drop_out(tmp_path, tiny_config):
    judges = CheckpointsOf("--model.init_args.judges", ("j0", "j1", "j2"), required=False)
    assert resolve([judges], {"j0": "/a.ckpt", "j2": "/c.ckpt"}) == ["--model.init_args.judges", '["/a.ckpt", "/c.ckpt"]']
    assert resolve([judges], {}) == []  # no judge left: no flag
    ensemble = CheckpointsOf("--model.init_args.reward_ensemble", ("rm", "m1"))
    assert resolve([ensemble], {"rm": "/rm.ckpt", "m1": "/m1.ckpt"})[1] == '["/rm.ckpt", "/m1.ckpt"]'
    with pytest.raises(ValueError):
        resolve([ensemble], {"rm": "/rm.ckpt"})
    plan = build_plan(load_study(str(_paper_study(tmp_path, tiny_config))), tmp_path / "out")
    rs_dpo = plan.stage("seed0/rs_dpo/default")
    assert rs_dpo.missing({"seed0/base": "b", "seed0/reward_model": "r", "seed0/reward_ensemble/member1": "m"}) == [
        "seed0/reward_ensemble/member2"]  # a failed member fails RS-DPO; a failed judge fails nothing
    assert "seed0/judge/judge0" in rs_dpo.needs and "seed0/judge/judge0" not in rs_dpo.missing({})


def test_dry_run_prints_the_judges_the_ensemble_and_the_all_targets_test(tmp_path, tiny_config, capsys):
    out = tmp_path / "out"
    experiment(str(_paper_study(tmp_path, tiny_config)), output_dir=str(out), dry_run=True)
    printed = capsys.readouterr().out
    assert not out.exists()
    assert printed.startswith("experiment tiny-paper: 16 stages, 1 seed")
    assert ("[--model.init_args.judges [<best.ckpt of seed0/judge/judge0>, <best.ckpt of seed0/judge/judge1>, "
            "<best.ckpt of seed0/judge/judge2>]]") in printed
    assert ("--model.init_args.reward_ensemble [<best.ckpt of seed0/reward_model>, "
            "<best.ckpt of seed0/reward_ensemble/member1>, <best.ckpt of seed0/reward_ensemble/member2>]") in printed
    assert printed.count("--data.eval_min_rating=null") == 10  # the all-targets test of each policy stage
    assert printed.count("  recpost test ") == 6 + 2 * 10


# ----------------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("body, message", [
    ("judges: {count: 0}\nmethods:\n  sft: {}\n", "judges.count must be an integer >= 1 (got 0)"),
    ("judges: 3\nmethods:\n  sft: {}\n", "judges must be a mapping with a count"),
    ("judges: {count: 2, seeds: 3}\nmethods:\n  sft: {}\n", "unknown keys ['seeds']"),
    ("methods:\n  sft:\n    reward_ensemble: {count: 3}\n", "SFT takes no reward ensemble"),
    ("methods:\n  rs_dpo:\n    reward_ensemble: {count: 1}\n", "reward_ensemble.count must be an integer >= 2 (got 1)"),
    ("methods:\n  rs_dpo:\n    reward_ensemble: {count: 3}\n", "ask for a reward_ensemble, whose members are trained like"),
    ("methods:\n  judge: {config: ../method/sft.yaml}\n", "'judge' names a stage the runner adds itself"),
    ("eval_min_rating: high\nmethods:\n  sft: {}\n", "eval_min_rating must be a rating (e.g. 4.5"),
    ("backbone: transformer\nmethods:\n  sft: {}\n", "unknown backbone 'transformer'"),
    ("methods:\n  sft: {}\nquick:\n  methods:\n    ppo: {epochs: 1}\n", "quick.methods.ppo: no such method in the study"),
    ("methods:\n  sft: {}\nquick:\n  name: other\n", "quick: unknown keys ['name']"),
    ("methods:\n  sft: {}\nquick:\n  judges: {count: 1}\n", "quick.judges scales down the study's judges: section"),
    ("methods:\n  sft: {}\nquick:\n  methods:\n    sft: {config: x.yaml}\n", "quick.methods.sft: unknown keys ['config']"),
])
def test_bad_paper_study_configs_are_one_clear_error(tmp_path, tiny_config, body, message):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"name: bad\npretrain_config: {tiny_config}\n{body}")
    with pytest.raises(RecpostError, match=re.escape(message)):
        load_study(str(cfg))


def test_rs_dpo_without_its_ensemble_is_refused_rather_than_run_as_plain_dpo(tmp_path, tiny_config):
    # configs/method/rs_dpo.yaml asks for an ensemble (reward_ensemble: []); a study that gives it none would
    # otherwise hand it the study's reward model and train plain DPO under the name rs_dpo.
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"name: bad\npretrain_config: {tiny_config}\nreward_model:\n  config: {ROOT / 'configs/method/reward_model.yaml'}\n"
                   "methods:\n  rs_dpo: {}\n")
    with pytest.raises(RecpostError, match=re.escape("reward_ensemble needs at least 2 RewardModel checkpoints (got 0)")):
        load_study(str(cfg))


def test_quick_without_a_quick_section_is_refused(tmp_path, tiny_config):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"name: q\npretrain_config: {tiny_config}\nmethods:\n  sft: {{}}\n")
    with pytest.raises(RecpostError, match="has no quick: section, so --quick cannot scale it down"):
        load_study(str(cfg), quick=True)


# ----------------------------------------------------------------------------------- --quick and the presets
def test_quick_scales_the_study_down_and_keeps_every_method_and_stage(tmp_path, tiny_config):
    cfg = _paper_study(tmp_path, tiny_config, extra="""quick:
  seeds: 1
  posttrain_epochs: 1
  reward_model: {epochs: 1}
  judges: {count: 2}
  methods:
    exp_sft: {grid: {lam: [1.0]}}
    rs_dpo: {reward_ensemble: {count: 2}}
""", seeds=3)
    full, quick = load_study(str(cfg)), load_study(str(cfg), quick=True)
    assert (full.name, full.seeds, full.judges.count) == ("tiny-paper", 3, 3)
    assert (quick.name, quick.seeds, quick.judges.count, quick.ensemble_size) == ("tiny-paper_quick", 1, 2, 2)
    assert [m.name for m in quick.methods] == [m.name for m in full.methods]
    assert next(m for m in quick.methods if m.name == "exp_sft").grid == {"lam": [1.0]}
    assert quick.eval_min_rating == full.eval_min_rating == 4.5  # the protocol is not scaled
    stages = {s.method for s in build_plan(quick, tmp_path / "out").stages}
    assert stages == {s.method for s in build_plan(full, tmp_path / "out").stages}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_paper_preset_runs_every_method_on_hstu_under_the_papers_protocol(name):
    path = ROOT / "configs" / "experiments" / f"{name}.yaml"
    for quick in (False, True):
        study = load_study(str(path), quick=quick)
        assert {m.name for m in study.methods} == PAPER_METHODS | CONTROLS
        assert study.eval_min_rating == 4.5 and study.judges.count >= 2
        assert next(m for m in study.methods if m.name == "rs_dpo").reward_ensemble >= 2
        backbone = {}
        for config in study.base_configs:  # as `recpost fit` composes them
            backbone.update(((yaml.safe_load(config.read_text()).get("model") or {}).get("init_args") or {}).get("backbone") or {})
        assert backbone["name"] == "hstu"
        lams = next(m for m in study.methods if m.name == "exp_sft").space["lam"]
        assert min(lams) <= 0.1 and max(lams) >= 5.0 and any(0.5 <= lam <= 1.0 for lam in lams)
        # the fair protocol: the same trials for every method, the learning rate tuned for each down to 1e-6
        assert study.trials >= 3 and {len(m.settings()) for m in study.methods} == {study.trials}
        assert all(min(m.space["lr"]) <= 1e-6 and 5e-4 in m.space["lr"] for m in study.methods)
        for method in study.methods:
            often = any(o.startswith(("--validation.every_n_steps=", "--trainer.val_check_interval=0.25"))
                        for o in method.overrides)
            assert often == (method.name in OFTEN_VALIDATED), method.name
        stages = build_plan(study, Path("/tmp/unused")).stages
        assert {s.method for s in stages} == PAPER_METHODS | CONTROLS | {"base", "reward_model", "reward_ensemble", "judge"}
    assert load_study(str(path)).posttrain_epochs == PRESETS[name]  # the paper's budgets: 30 / 12 / 10


def test_the_ml1m_preset_reads_this_projects_ml1m_copy():
    study = load_study(str(ROOT / "configs" / "experiments" / "paper_ml1m.yaml"))
    data = yaml.safe_load(study.data_config.read_text())["data"]["source"]["init_args"]
    assert data["root"] == "$RECPOST_DATA_DIR/ml-1m-users1-2999" and data["variant"] == "1m"  # found from any folder


def test_cli_quick_dry_run_of_the_ml100k_preset_prints_a_one_seed_plan(tmp_path):
    from tests.helpers import recpost

    out = recpost("experiment", "--config", str(ROOT / "configs/experiments/paper_ml100k.yaml"), "--quick", "--dry-run",
                  "--output_dir", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-2000:]
    # RM, 1 more ensemble member, 2 judges, base, then 12 methods x 3 trials
    assert out.stdout.startswith("experiment paper_ml100k_quick: 41 stages, 1 seed")
    assert re.search(r"\[41/41\] seed0/rs_dpo/lr[0-9.e-]+-beta", out.stdout) and not (tmp_path / "out").exists()
    assert "  sft: lr [1e-06, 1e-05, 5e-05, 0.0001, 0.0005, 0.001] -> lr=0.0005; " in out.stdout  # the lr grid


# ----------------------------------------------------------------------------------- running and reporting
def _stand_in_cli(calls: list[list[str]]):
    """Replaces ``Runner._recpost``: records the command and writes what a real run writes (a test over
    every target gets other numbers than the filtered one)."""

    def run(self, args, log, watch=None, epochs=None, label=""):
        calls.append(list(args))
        root = Path(args[args.index("--trainer.default_root_dir") + 1])
        run = RunFolder(root / LOGS_DIR / f"{VERSION_PREFIX}{len(run_folders(root))}")
        run.checkpoints.mkdir(parents=True)
        if args[0] == "fit":
            run.best_checkpoint.write_text("weights")
            run.metrics_csv.write_text("epoch,step,val/ndcg@10,val/rmse\n0,1,0.1,0.9\n")
            return 0
        every = ALL_TARGETS in args
        ndcg = 0.2 if every else 0.3
        judged = "--model.init_args.judges" in args
        metrics = {"test/ndcg@10": ndcg, **({"test/judge_reward@10": 4.0, "test/judge_reward@10_std": 0.1} if judged else {})}
        run.metrics_json("test").write_text(json.dumps(metrics))
        users = range(20) if every else range(5)  # the filter keeps fewer users
        run.per_user_csv.write_text("user_index,ndcg@10" + (",judge_reward@10" if judged else "") + "\n" + "".join(
            f"{u},{ndcg + 0.01 * u}" + (f",{4.0 + 0.01 * u}" if judged else "") + "\n" for u in users))
        return 0

    return run


def test_the_runner_stores_the_all_targets_test_and_the_table_reports_judges_and_both_protocols(
        tmp_path, tiny_config, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(Runner, "_recpost", _stand_in_cli(calls))
    out = tmp_path / "out"
    experiment(str(_paper_study(tmp_path, tiny_config)), output_dir=str(out))
    rows = json.loads((out / "results.json").read_text())
    assert {r["status"] for r in rows} == {"ok"}
    sft = next(r for r in rows if r["method"] == "sft")
    assert (sft["test/ndcg@10"], sft["test_all/ndcg@10"], sft["test/judge_reward@10"]) == (0.3, 0.2, 4.0)
    judge_rows = [r for r in rows if r["method"] == "judge"]
    assert [r["setting"] for r in judge_rows] == [{"judge": k, "kind": "same_base"} for k in range(3)]
    assert "test_all/ndcg@10" not in judge_rows[0]
    record = json.loads((out / "seed0" / "rs_dpo" / "default" / "stage.json").read_text())
    ensemble = json.loads(_arg(record["fit_command"], "--model.init_args.reward_ensemble"))
    assert len(ensemble) == 3 and all(Path(p).name == "best.ckpt" for p in ensemble)
    assert len(json.loads(_arg(record["test_all_command"], "--model.init_args.judges"))) == 3
    md = (out / "results.md").read_text()
    header = max((line for line in md.splitlines() if line.startswith("| method |")), key=len)  # every setting's table
    for column in ("test/judge_reward@10", "test/judge_reward@10_std", "test_all/ndcg@10", "Δ test/ndcg@10 vs sft [95% CI]",
                   "Δ test_all/ndcg@10 vs sft [95% CI]", "Δ test/judge_reward@10 vs sft [95% CI]"):
        assert f" {column} |" in header
    for method in PAPER_METHODS:
        assert f"| {method} |" in md
    assert "| judge | 3/3 |" in md and "| reward_ensemble | 2/2 |" in md
    assert "`test_all/`: the same checkpoints tested on every user's target" in md and "`judge_reward@10`: the judges'" in md
    calls.clear()
    experiment(str(_paper_study(tmp_path, tiny_config)), output_dir=str(out))  # everything reused
    assert calls == []


def test_the_paired_bootstrap_against_bc_covers_the_all_targets_test(tmp_path):
    rows = [{"method": m, "setting": {}, "seed": 0, "status": "ok", "val/ndcg@10": 0.1, "test/ndcg@10": 0.1,
             "test_all/ndcg@10": 0.1} for m in ("sft", "linear_sft")]
    per_user = {("sft", "{}", 0): {u: {"ndcg@10": 0.1, "test_all/ndcg@10": 0.1} for u in range(50)},
                ("linear_sft", "{}", 0): {u: {"ndcg@10": 0.1, "test_all/ndcg@10": 0.3} for u in range(50)}}
    write_results(rows, tmp_path, "val/ndcg@10", per_user=per_user)
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if x.startswith("| linear_sft |"))
    assert "+0.0000 [+0.0000, +0.0000]" in line and "+0.2000 [+0.2000, +0.2000]" in line


@pytest.mark.slow
def test_a_tiny_paper_study_runs_for_real_with_judges_an_ensemble_and_both_protocols(tmp_path, tiny_config, monkeypatch):
    from tests.helpers import pretrained_checkpoint, tiny_datamodule

    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = pretrained_checkpoint(tiny_datamodule(tiny_config.parent), tmp_path / "base.ckpt")  # the config's catalog
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"""
name: tiny-real
pretrain_config: {tiny_config}
pretrained: [{base}]
posttrain_epochs: 1
eval_min_rating: 4.5
reward_model:
  config: {ROOT / 'configs/method/reward_model.yaml'}
  epochs: 1
judges: {{count: 2}}
methods:
  ppo:
    overrides: ["--model.init_args.k=2"]
    grid:
      kl_coef: [0.1]
  rs_dpo:
    reward_ensemble: {{count: 2}}
""")
    out = experiment(str(cfg), output_dir=str(tmp_path / "out"))
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["reward_model", "reward_ensemble", "judge", "judge", "ppo", "rs_dpo"]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    # The RLHF stages use the study's reward model (this study also stands for the plain RLHF one:
    # PPO's training RM is the reward_model stage's checkpoint, and it scores PPO's top 10).
    assert {"test/rmse", "test/rmse_item_mean", "test/rmse_user_mean", "test/rmse_global_mean"} <= set(rows[0])
    ppo = rows[-2]
    assert "val/rm_reward@10" in ppo and "test/rm_reward@10" in ppo
    ppo_cmd = json.loads((out / "seed0" / "ppo" / "kl_coef0.1" / "stage.json").read_text())["fit_command"]
    assert ppo_cmd[ppo_cmd.index("--model.init_args.reward_model") + 1] == json.loads(
        (out / "seed0" / "reward_model" / "stage.json").read_text())["checkpoint"]
    assert "| reward_model | 1/1 |" in (out / "results.md").read_text()
    assert (out / "figures" / "ppo_training_curves.png").is_file()
    assert not (out / "seed0" / "ppo" / "kl_coef0.1" / "wandb").exists()  # WANDB_MODE=disabled: nothing written
    rs_dpo = rows[-1]
    assert {"val/judge_reward@10", "test/judge_reward@10", "test/judge_reward@10_std", "test_all/judge_reward@10"} <= set(rs_dpo)
    assert rs_dpo["test/n_users"] < rs_dpo["test_all/n_users"] == 101  # the protocol's users, then every user
    assert "pairs/kept" in Path(rs_dpo["metrics_csv"]).read_text().splitlines()[0]  # trained on the ensemble's pairs
    assert all("test/n_users" in r and r["test/n_users"] == 101 for r in rows[:4])  # RMs: tested on every target
    assert "| rs_dpo |" in (out / "results.md").read_text()


def test_the_training_curves_add_the_judges_panel_and_the_lambda_figures_cover_judges_and_every_target(tmp_path, monkeypatch):
    from recpost.experiment import figures

    assert figures.metric_label("test_all/ndcg@10") == "NDCG@10 (test, every target)"
    assert figures.metric_label("val/judge_reward@10") == "judges' rating of the top 10 (stars, validation)"
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,val/rm_reward@10,val/ndcg@10,val/judge_reward@10\n0,4,3.9,0.10,3.8\n1,8,4.2,0.08,3.7\n")
    panels = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: panels.append(len(fig.axes)) or path)
    rows = [{"method": "online_dpo", "setting": {"beta": 0.1}, "seed": 0, "status": "ok", "metrics_csv": str(csv_path)}]
    assert figures.training_curves(rows, "online_dpo", tmp_path / "curves.png") is not None and panels == [3]
    rows = [{"method": "exp_sft", "setting": {"lam": lam}, "seed": 0, "status": "ok", "test/judge_reward@10": 3.5 + lam,
             "test_all/ndcg@10": 0.1} for lam in (0.5, 1.0)]
    written = {p.name for p in figures.write_all(rows, tmp_path / "figures")}
    assert {"judge_reward_at_10_vs_lambda.png", "all_targets_ndcg_at_10_vs_lambda.png"} <= written


def test_boolean_flags_of_a_function_command_work_alone_or_with_a_value():
    from recpost.cli.functions import _boolean_flags

    spellings = {"--quick": "--quick", "--dry-run": "--dry_run", "--dry_run": "--dry_run"}
    assert _boolean_flags(["--quick", "--dry-run"], spellings) == ["--quick=true", "--dry_run=true"]
    assert _boolean_flags(["--quick", "false", "--config", "x.yaml"], spellings) == ["--quick", "false", "--config", "x.yaml"]
