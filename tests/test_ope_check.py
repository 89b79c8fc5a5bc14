"""``python -m recpost.diagnostics.ope_check``: off-policy estimates of trained policies beside their true values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recpost.data import RecDataModule
from recpost.core.errors import RecpostError
from recpost.evaluation.off_policy import importance_weights
from recpost.methods import SFT
from recpost.diagnostics.ope_check import (
    ESTIMATORS, Policy, estimate_policies, logged_samples, main, named_checkpoints, policy_name,
)
from tests.helpers import build, reward_model_checkpoint, save_checkpoint, write_tiny_config

# Every world item is consumed by someone (so the catalog is the world) and sequences are short: fast.
WORLD = dict(n_users=100, n_items=30)
SEQUENCES = dict(min_seq_len=5, max_seq_len=9)
CONFIG = """
data:
  source:
    class_path: recpost.data.Simulator
    init_args:
      min_seq_len: {min_seq_len}
      max_seq_len: {max_seq_len}
      world: {world}
  max_len: 8
  cache_dir: {cache}
"""


def sim_config(folder: Path, **world) -> Path:
    path = folder / "sim.yaml"
    path.write_text(CONFIG.format(world=json.dumps({**WORLD, **world}), cache=folder / "cache", **SEQUENCES))
    return path


def sim_datamodule(folder: Path, **world) -> RecDataModule:
    return RecDataModule.from_configs([sim_config(folder, **world)])


def sft_checkpoint(dm: RecDataModule, path: Path, steps: int, seed: int = 0) -> Path:
    """An SFT policy trained ``steps`` batches of 16 windows (0: its random initialisation)."""
    model = build(SFT, dm, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    n_windows = len(dm.train_windows()[0])
    for i in range(steps):
        loss, _ = model.training_loss(dm.train_batch([(16 * i + j) % n_windows for j in range(16)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(model, path)


def behaviour_policy(dm: RecDataModule, power: float = 1.0) -> Policy:
    """``pi proportional to pi_beta ** power`` over the catalog (``power`` 1: the logging policy itself)."""
    truth = dm.ground_truth

    def catalog_scores(batch):
        log_beta = truth.catalog_behavior_logits(batch["user_index"], batch["history_items"])  # [B, V]
        return torch.cat([torch.full((len(log_beta), 1), -math.inf), power * log_beta], dim=1)

    return Policy(f"pi_beta^{power:g}", "simulator", catalog_scores)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny simulator config, its reward model and two SFT policies (trained 0 and 6 batches)."""
    folder = tmp_path_factory.mktemp("ope")
    config = sim_config(folder)
    dm = RecDataModule.from_configs([config])
    rm = reward_model_checkpoint(dm, folder / "rm.ckpt", steps=2)
    untrained = sft_checkpoint(dm, folder / "untrained.ckpt", steps=0)
    sft = sft_checkpoint(dm, folder / "runs" / "seed0" / "sft" / "default" / "fit" / "lightning_logs" / "version_0"
                         / "checkpoints" / "best.ckpt", steps=6)
    return dm, config, rm, untrained, sft


def test_the_logging_policy_itself_has_weights_one_and_ips_is_the_mean_rating(trained):
    dm, _, rm, _, _ = trained
    assert dm.n_items == WORLD["n_items"]  # the catalog is the world: pi_beta normalised over the catalog is pi_beta
    samples = logged_samples(dm, [behaviour_policy(dm)], str(rm))
    cols = samples["policies"]["pi_beta^1"]
    w = importance_weights(cols["target_prob"], samples["behavior_prob"])
    assert torch.allclose(w, torch.ones_like(w), atol=1e-4)
    est = estimate_policies(samples)["policies"]["pi_beta^1"]["estimates"]
    mean_rating = float(samples["reward"].mean())
    assert est["ips"]["value"] == pytest.approx(mean_rating, abs=1e-3)
    assert est["snips"]["value"] == pytest.approx(mean_rating, abs=1e-3)
    assert est["ips"]["ess"] == pytest.approx(len(w), rel=1e-4)
    assert float(cols["support_deficit"].max()) == 0.0


def test_ips_and_dr_recover_the_expected_rating_of_another_policy_from_the_real_logs(tmp_path):
    # A known answer: with exact propensities, IPS and DR are unbiased for E_pi[E[rating | r*]], which the
    # simulator computes in closed form. 3,000 logged test items, one per user, drawn by the simulator.
    dm = sim_datamodule(tmp_path, n_users=3000)
    rm = reward_model_checkpoint(dm, tmp_path / "rm.ckpt", steps=2)
    policy = behaviour_policy(dm, power=0.5)  # flatter than pi_beta: weights up to ~1/sqrt(pi_beta)
    samples = logged_samples(dm, [policy], str(rm))
    report = estimate_policies(samples)["policies"][policy.name]
    truth = report["rating_value"]["value"]
    for name in ("ips", "snips", "dr"):
        est = report["estimates"][name]
        assert abs(est["value"] - truth) < 4 * est["stderr"], name
    assert report["true_value"]["value"] != pytest.approx(truth, abs=1e-3)  # stars are not r*: rounding, clipping
    w = importance_weights(samples["policies"][policy.name]["target_prob"], samples["behavior_prob"])
    assert abs(float(w.mean()) - 1) < 4 * float(w.std()) / math.sqrt(len(w))  # E_beta[pi / pi_beta] = 1
    # The check has power: propensities without the visit's slate (what a model of pi_beta from histories
    # alone could give) are far off.
    batch = dm.eval_batch(range(dm.data.n_users), "test")
    log_beta = dm.ground_truth.catalog_behavior_logits(batch["user_index"], batch["history_items"], slate=False)
    no_slate = log_beta.gather(1, (batch["target_item"] - 1)[:, None]).squeeze(1).double().exp()
    w_wrong = importance_weights(samples["policies"][policy.name]["target_prob"], no_slate)
    assert abs(float(w_wrong.mean()) - 1) > 10 * float(w_wrong.std()) / math.sqrt(len(w_wrong))


def test_mass_outside_the_users_exposure_set_is_reported_as_support_deficit(tmp_path):
    # With candidates, pi_beta never shows a user the items outside their pool: IPS cannot see a policy's mass there.
    dm = sim_datamodule(tmp_path, candidates=20)
    rm = reward_model_checkpoint(dm, tmp_path / "rm.ckpt", steps=1)
    spread = Policy.from_checkpoint("spread", str(sft_checkpoint(dm, tmp_path / "sft.ckpt", steps=0)), dm)
    report = estimate_policies(logged_samples(dm, [spread, behaviour_policy(dm)], str(rm)))["policies"]
    # an untrained policy spreads over the catalog; about a third of the items are outside each pool
    assert 0.15 < report["spread"]["support_deficit"] < 0.6
    assert report["pi_beta^1"]["support_deficit"] == 0.0


def test_the_true_value_is_the_evaluations_true_reward_sampled(trained, tmp_path):
    dm, _, rm, _, _ = trained
    module = build(SFT, dm, seed=3).eval()  # the method's own evaluation scores its policy
    policy = Policy.from_checkpoint("sft", str(save_checkpoint(module, tmp_path / "sft.ckpt")), dm)
    samples = logged_samples(dm, [policy], str(rm), split="val")
    batch = dm.eval_batch(range(dm.data.n_users), "val")
    with torch.no_grad():
        expected = dm.ground_truth.evaluate(batch, module.catalog_scores(batch))["true_reward_sampled"]
    assert torch.allclose(samples["policies"]["sft"]["true_value"], expected.double(), atol=1e-6)


def test_the_command_writes_every_estimator_and_the_true_value(trained, tmp_path):
    _, config, rm, untrained, sft = trained
    out = tmp_path / "ope.json"
    done = subprocess.run(
        [sys.executable, "-m", "recpost.diagnostics.ope_check", "--config", str(config), "--reward_model", str(rm),
         "--policy", f"random={untrained}", str(sft), "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["policies"]) == ["random", "sft/default"]  # the second named after its run folder
    assert report["contexts"] == WORLD["n_users"] and report["split"] == "test"
    for p in report["policies"].values():
        assert set(p["estimates"]) == set(ESTIMATORS)
        assert all(math.isfinite(e["value"]) and math.isfinite(e["stderr"]) for e in p["estimates"].values())
        assert 1 <= p["true_value"]["value"] <= 5 and 1 <= p["rating_value"]["value"] <= 5
        assert p["support_deficit"] == 0.0
    assert set(report["ranking"]) == {*ESTIMATORS, "rating_value"}
    assert set(report["ranking"]["ips"]) == {"kendall_tau", "pairs_in_order", "best_found"}
    assert "IPS" in done.stdout and "Kendall tau" in done.stdout


def test_policy_names_come_from_the_run_folders():
    run = "lightning_logs/version_0/checkpoints/best.ckpt"
    assert policy_name(f"runs/experiments/sim/seed0/exp_sft/lam0.25/fit/{run}") == "exp_sft/lam0.25"
    assert policy_name(f"runs/experiments/sim/seed1/base/fit/{run}") == "base"
    assert policy_name(f"runs/pretrain-sim/{run}") == "pretrain-sim"
    assert policy_name("elsewhere/my_policy.ckpt") == "my_policy"
    assert named_checkpoints(["a=x.ckpt", "y.ckpt"]) == {"a": "x.ckpt", "y": "y.ckpt"}
    with pytest.raises(RecpostError, match="two policies are named 'base'"):
        named_checkpoints([f"s0/seed0/base/fit/{run}", f"s1/seed0/base/fit/{run}"])


@pytest.mark.parametrize("case, message", [
    ("table_data", "needs simulator data"),
    ("missing_policy", "--policy: checkpoint not found"),
    ("reward_model_as_policy", "is a reward model"),
    ("missing_reward_model", "--reward_model: checkpoint not found"),
    ("sparse_feedback", "feedback_rate=0.5 leaves unrated consumptions out of the log"),
])
def test_bad_input_is_one_clear_line(trained, tmp_path, case, message):
    dm, config, rm, untrained, _ = trained
    args = dict(config=[str(config)], policy=[str(untrained)], reward_model=str(rm))
    if case == "table_data":
        args["config"] = [str(write_tiny_config(tmp_path))]
    elif case == "missing_policy":
        args["policy"] = [str(tmp_path / "nope.ckpt")]
    elif case == "reward_model_as_policy":
        args["policy"] = [str(rm)]
    elif case == "missing_reward_model":
        args["reward_model"] = str(tmp_path / "nope.ckpt")
    else:
        args["config"] = [str(sim_config(tmp_path, feedback_rate=0.5))]
    with pytest.raises(RecpostError, match=message) as exc:
        main(**args)
    assert "\n" not in str(exc.value)
