"""A study's judge panel (``judges: {kinds: [...]}``): judges that share less with the training reward model
(from scratch, the other backbone, matrix factorisation), as the plan's commands build them, and bad panels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recpost.core.errors import RecpostError
from recpost.experiment import build_plan, load_study
from recpost.experiment.judging import study_backbone
from recpost.experiment.plan import CheckpointOf
from recpost.experiment.roles import role_seed

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (ROOT / "recpost" / "configs").resolve()


def _study(tmp_path: Path, tiny_config: Path, judges: str, extra: str = "") -> Path:
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"""
name: tiny-panel
pretrain_config: {tiny_config}
posttrain_epochs: 1
wandb: false
reward_model:
  config: {ROOT / 'configs/method/reward_model.yaml'}
  epochs: 2
judges: {judges}
methods:
  sft: {{}}
  ppo: {{}}
{extra}""")
    return cfg


def _configs(args) -> list[Path]:
    """The config files a command composes, in order (symlinks resolved: ``configs`` is ``recpost/configs``)."""
    return [Path(args[i + 1]).resolve() for i, a in enumerate(args) if a == "--config"]


def _arg(args, flag: str) -> str:
    return args[list(args).index(flag) + 1]


def test_the_dry_run_plan_builds_judges_of_different_init_backbone_and_model(tmp_path, tiny_config):
    panel = "{kinds: [same_base, scratch, other_backbone, {kind: mf, epochs: 7}]}"
    plan = build_plan(load_study(str(_study(tmp_path, tiny_config, panel))), tmp_path / "out")
    judges = [s for s in plan.stages if s.method == "judge"]
    assert [s.setting for s in judges] == [{"judge": 0, "kind": "same_base"}, {"judge": 1, "kind": "scratch"},
                                           {"judge": 2, "kind": "other_backbone"}, {"judge": 3, "kind": "mf"}]
    same_base, scratch, other, mf = (j.fit_args for j in judges)
    base = CheckpointOf("--model.init_args.init_from", "seed0/base")
    # only the same-base judge starts from the base checkpoint, as the training RM does
    assert base in same_base and base in plan.stage("seed0/reward_model").fit_args
    assert not any(isinstance(a, CheckpointOf) for a in (*scratch, *other, *mf))
    # the RM-kind judges train the reward-model config; the other-backbone one on HSTU (the tiny study is SASRec)
    assert study_backbone([tiny_config]) == "sasrec"
    rm_config = SHIPPED / "method/reward_model.yaml"
    assert _configs(same_base)[1:] == _configs(scratch)[1:] == [rm_config]
    assert _configs(other)[1:] == [rm_config, SHIPPED / "backbone/hstu.yaml"]
    assert _configs(mf)[1:] == [SHIPPED / "method/mf_reward_model.yaml"]
    # epochs: the panel's default (the reward model's 2) for the RM kinds, the kind's own for mf
    assert [_arg(a, "--trainer.max_epochs") for a in (same_base, scratch, other, mf)] == ["2", "2", "2", "7"]
    # each judge on its own seed and bootstrap resample of the users
    for k, args in enumerate((same_base, scratch, other, mf)):
        seed = role_seed(0, "judge", k)
        assert _arg(args, "--seed_everything") == str(seed)
        assert "--data.train_users=bootstrap" in args and f"--data.train_users_seed={seed}" in args
    # every policy's test compares the judges with the study's RM
    reference = CheckpointOf("--model.init_args.judge_reference", "seed0/reward_model", required=False)
    policies = [s for s in plan.stages if s.method in ("base", "sft", "ppo")]
    assert len(policies) == 3 and all(reference in s.test_args for s in policies)
    assert all(reference not in s.fit_args for s in policies)  # test-time only: the fits are unchanged
    printed = plan.describe()
    assert "seed0/judge/judge3 (seed 0 judge judge3-kindmf)" in printed and "[--model.init_args.judge_reference" in printed


def test_a_count_cycles_through_the_kinds_and_an_old_count_is_same_base_judges(tmp_path, tiny_config):
    study = load_study(str(_study(tmp_path, tiny_config, "{count: 5, kinds: [scratch, mf]}")))
    assert [j.kind for j in study.judges.members()] == ["scratch", "mf", "scratch", "mf", "scratch"]
    old = load_study(str(_study(tmp_path, tiny_config, "{count: 2}")))
    assert [j.kind for j in old.judges.members()] == ["same_base", "same_base"]
    assert all(j.continued for j in old.judges.members())


def test_quick_takes_the_first_kinds_of_the_panel(tmp_path, tiny_config):
    extra = "quick:\n  judges: {count: 2}\n"
    cfg = _study(tmp_path, tiny_config, "{kinds: [scratch, other_backbone, mf]}", extra)
    assert [j.kind for j in load_study(str(cfg)).judges.members()] == ["scratch", "other_backbone", "mf"]
    assert [j.kind for j in load_study(str(cfg), quick=True).judges.members()] == ["scratch", "other_backbone"]


def test_an_hstu_study_gets_a_sasrec_judge(tmp_path, tiny_config):
    plan = build_plan(load_study(str(_study(tmp_path, tiny_config, "{kinds: [other_backbone]}", "backbone: hstu\n"))),
                      tmp_path / "out")
    assert _configs(plan.stage("seed0/judge/judge0").fit_args)[-1] == SHIPPED / "backbone/sasrec.yaml"


@pytest.mark.parametrize("judges, message", [
    ("{kinds: [clone]}", "judges.kinds[0]: unknown judge kind 'clone'; use one of same_base, scratch, other_backbone, mf"),
    ("{kinds: []}", "judges.kinds must be a non-empty list of judge kinds"),
    ("{kinds: [{kind: mf, seeds: 2}]}", "judges.kinds[0]: unknown keys ['seeds']"),
    ("{kinds: [{kind: mf, epochs: 0}]}", "judges.kinds[0].epochs must be an integer >= 1 (got 0)"),
    ("{count: 0, kinds: [mf]}", "judges.count must be an integer >= 1 (got 0)"),
    ("{kinds: [{kind: mf, config: ../method/reward_model.yaml}]}", "is not a judge of kind mf"),
    ("{kinds: [{kind: scratch, config: ../method/mf_reward_model.yaml}]}", "is not a judge of kind scratch"),
    ("{kinds: [{kind: mf, config: ../method/sft.yaml}]}", "is not a rating model (SFT)"),
    ("{kinds: [{kind: mf, overrides: ['--model.init_args.prior_count=3']}]}", "MFRewardModel has no setting 'prior_count'"),
    ("{kinds: [{kind: mf, overrides: ['--model.init_args.rank=0']}]}", "model.rank must be an integer >= 1"),
])
def test_bad_judge_panels_are_one_clear_error(tmp_path, tiny_config, judges, message):
    cfg = _study(tmp_path, tiny_config, judges)
    (tmp_path / "method").mkdir()
    for name in ("reward_model", "mf_reward_model", "sft"):  # ../method/<name>.yaml beside the study
        (tmp_path / "method" / f"{name}.yaml").write_text((ROOT / "configs/method" / f"{name}.yaml").read_text())
    (tmp_path / "study").mkdir()
    moved = tmp_path / "study" / "study.yaml"
    moved.write_text(cfg.read_text())
    with pytest.raises(RecpostError, match=re.escape(message)):
        load_study(str(moved))


def _rows() -> list[dict]:
    """Result rows of a 2-seed study with a same-base and an MF judge (as results.json holds them)."""

    def judge(k, kind, seed, corr, rmse):
        return {"method": "judge", "setting": {"judge": k, "kind": kind}, "seed": seed, "status": "ok",
                "test/rmse": rmse, "rm_error_corr": corr}

    def policy(method, seed, chosen, corr0, corr1, overlap0=0.9, overlap1=0.2):
        return {"method": method, "setting": {"lam": 1.0} if method == "exp_sft" else {}, "seed": seed, "status": "ok",
                "chosen": chosen, "test/judge0_rank_corr@10": corr0, "test/judge1_rank_corr@10": corr1,
                "test/judge_rank_corr@10": (corr0 + corr1) / 2, "test/judge0_rm_overlap@10": overlap0,
                "test/judge1_rm_overlap@10": overlap1, "test/judge_reward@10": 3.9, "test/judge0_reward@10": 3.8 + seed / 10,
                "test/judge1_reward@10": 4.0}

    return [judge(0, "same_base", 0, 0.99, 1.01), judge(0, "same_base", 1, 0.97, 1.03), judge(1, "mf", 0, 0.6, 0.99),
            judge(1, "mf", 1, 0.7, 0.98), policy("sft", 0, True, 0.9, 0.1), policy("sft", 1, True, 0.8, 0.3),
            policy("exp_sft", 0, False, 0.0, 0.0), {**policy("ppo", 0, True, 0.5, -0.5), "test/rm_reward@10": 4.3}]


def test_the_judge_tables_render_the_panel_and_the_agreement_from_the_rows_alone():
    from recpost.experiment.judge_table import judge_tables

    rows = _rows()
    md = "\n".join(judge_tables(rows))
    assert "| judge0 | same_base | 2/2 | 1.020 ± 0.014 | 0.980 ± 0.014 | 0.900 ± 0.000 |" in md
    assert "| judge1 | mf | 2/2 | 0.985 ± 0.007 | 0.650 ± 0.071 | 0.200 ± 0.000 |" in md
    assert "| method | setting | seeds | judge0 (same_base) rank corr. | judge1 (mf) rank corr. | mean rank corr." in md
    assert "| sft | - | 2 | 0.850 ± 0.071 | 0.200 ± 0.141 | 0.525 ± 0.035 | - | 3.900 ± 0.000 |" in md
    assert "| ppo | - | 1 | 0.500 | -0.500 | 0.000 | 4.300 | 3.900 |" in md
    assert "exp_sft" not in md  # only the settings chosen on validation
    # each judge's rating of the policy's top 10, beside the training RM's (PPO's only: it trains against it)
    assert "| method | setting | seeds | training RM | judge0 (same_base) | judge1 (mf) |" in md
    assert "| sft | - | 2 | - | 3.850 ± 0.071 | 4.000 ± 0.000 |" in md and "| ppo | - | 1 | 4.300 | 3.800 | 4.000 |" in md
    assert "Reward hacking is claimed only where" in md
    assert judge_tables([r for r in rows if r["method"] != "judge"]) == []  # no judges, no table


def test_results_md_shows_the_judge_tables():
    from recpost.experiment.render import render_results

    md = render_results(_rows())
    assert "| judge1 | mf | 2/2 |" in md and "judge1 (mf) rank corr." in md
