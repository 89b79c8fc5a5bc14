"""Reward model: its regression loss, its rating baselines, loading it frozen, and evaluating with it."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from recpost.models.checkpoint import load_reward_model
from recpost.data import RecDataModule, Table
from recpost.core.errors import RecpostError
from recpost.methods import SFT, RewardModel
from recpost.methods.reward_model import rating_baselines
from tests.helpers import (
    build,
    init_reward_biases,
    last_metrics,
    pretrained_checkpoint,
    recpost,
    reward_model_checkpoint,
    tiny_datamodule,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "method" / "reward_model.yaml"

# Two users, four items each; training part = all but the last two (validation, test targets):
#   u0: a 5, b 3 | val c 4 | test d 2        u1: a 1, c 4 | val b 5 | test d 3
# global mean 13/4 = 3.25; item means a 3, b 3, c 4, d (no training rating) 3.25; user means u0 4, u1 2.5.
TABLE = """user_id,item_id,rating,timestamp
u0,a,5,1
u0,b,3,2
u0,c,4,3
u0,d,2,4
u1,a,1,1
u1,c,4,2
u1,b,5,3
u1,d,3,4
"""


@pytest.fixture
def datamodule(tmp_path: Path) -> RecDataModule:
    return tiny_datamodule(tmp_path)


def _validate_and_test(tmp_path: Path) -> tuple[dict, dict]:
    csv = tmp_path / "table.csv"
    csv.write_text(TABLE)
    dm = RecDataModule(Table(str(csv), name="table"), max_len=8, cache_dir=str(tmp_path / "cache"))
    rm = build(RewardModel, dm)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(rm, datamodule=dm, verbose=False)[0], trainer.test(rm, datamodule=dm, verbose=False)[0]


def test_rating_baselines_match_a_hand_computed_table():
    item = np.array([1, 2, 3, 4, 1, 3, 2, 4])  # the TABLE above with a=1, b=2, c=3, d=4
    rating = np.array([5.0, 3, 4, 2, 1, 4, 5, 3])
    user = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    train = np.array([True, True, False, False, True, True, False, False])  # the last two of each user are held out
    global_mean, item_mean, user_mean = rating_baselines(item[train], rating[train], user[train], n_items=4, n_users=2)
    assert global_mean == 3.25
    assert item_mean[1:].tolist() == [3.0, 3.0, 4.0, 3.25]
    assert user_mean.tolist() == [4.0, 2.5]


def test_baseline_errors_are_logged_next_to_the_models_own(tmp_path):
    val, test = _validate_and_test(tmp_path)
    assert val["val/rmse_global_mean"] == pytest.approx(math.sqrt((0.75**2 + 1.75**2) / 2))
    assert val["val/mae_global_mean"] == pytest.approx(1.25)
    assert val["val/rmse_item_mean"] == pytest.approx(math.sqrt((0**2 + 2**2) / 2))
    assert val["val/rmse_user_mean"] == pytest.approx(math.sqrt((0**2 + 2.5**2) / 2))
    # test target d has no training rating: its item mean is the global mean
    assert test["test/rmse_item_mean"] == pytest.approx(math.sqrt((1.25**2 + 0.25**2) / 2))
    assert {"val/rmse", "val/mae", "val/ndcg@10"} <= set(val)


def test_the_models_mean_signed_error_is_logged_as_bias(tmp_path):
    # The untrained head (all biases 0, user weight 1) predicts the shrunk mean of the history's ratings:
    # u0 (a 5, b 3) -> 8 / (2 + 5) for c (4 stars); u1 (a 1, c 4) -> 5 / 7 for b (5 stars).
    val, _ = _validate_and_test(tmp_path)
    errors = [8 / 7 - 4, 5 / 7 - 5]
    assert val["val/bias"] == pytest.approx(sum(errors) / 2, rel=1e-5)
    assert val["val/rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 2), rel=1e-5)


def test_regression_loss_on_a_known_case():
    rm = RewardModel(n_items=4, max_len=4, prior_count=0.0)
    with torch.no_grad():
        rm.head.bias.fill_(3.0)
        rm.head.item_bias[1] = 1.0
    batch = {
        "input_items": torch.tensor([[0, 3, 1]]), "input_ratings": torch.tensor([[0.0, 4.0, 5.0]]),
        "next_items": torch.tensor([[0, 1, 2]]), "next_ratings": torch.tensor([[0.0, 5.0, 2.0]]),
    }
    # user deviation m_t (prior 0): after item 3 (4 stars, predicted 3): 1; after item 1 (5, predicted 4): (1 + 1) / 2
    # predictions: 3 + 1 + 1 = 5 for item 1 (rated 5), 3 + 0 + 1 = 4 for item 2 (rated 2) -> MSE (0 + 4) / 2
    loss, logs = rm.training_loss(batch)
    assert loss.item() == pytest.approx(2.0)
    assert logs["rmse"].item() == pytest.approx(math.sqrt(2.0))
    with torch.no_grad():
        rm.head.user_weight.fill_(0.0)  # without the user term: 4 vs 5, 3 vs 2 -> MSE 1
    assert rm.training_loss(batch)[0].item() == pytest.approx(1.0)


def test_the_untrained_head_predicts_the_shrunk_item_mean(datamodule):
    rm = init_reward_biases(build(RewardModel, datamodule, prior_count=5.0), datamodule)
    train = datamodule.training_interactions()
    global_mean, _, _ = rating_baselines(train.item, train.rating, train.user, datamodule.n_items, datamodule.data.n_users)
    items = torch.tensor([[0, 0, 0]])  # empty history: no user deviation
    pred = rm.predict_rewards(items, torch.zeros(1, 3))[0]
    assert rm.head.bias.item() == pytest.approx(global_mean, rel=1e-6)
    assert torch.allclose(pred[1:], global_mean + rm.head.item_bias[1:], atol=1e-5)


def test_catalog_and_candidate_predictions_agree(datamodule):
    rm = build(RewardModel, datamodule).eval()
    batch = datamodule.eval_batch(list(range(8)), "val")
    full = rm.predict_rewards(batch["input_items"], batch["input_ratings"])  # [8, V + 1]
    cand = torch.randint(1, datamodule.n_items + 1, (8, 5))
    assert torch.allclose(rm.predict_rewards(batch["input_items"], batch["input_ratings"], cand), full.gather(1, cand), atol=1e-5)


def test_a_missing_reward_model_checkpoint_is_one_clear_error(datamodule, tmp_path):
    with pytest.raises(RecpostError, match="checkpoint not found.*reward model is needed"):
        load_reward_model(str(tmp_path / "nope.ckpt"), datamodule.item_map_hash)


def test_a_policy_checkpoint_is_not_a_reward_model(datamodule, tmp_path):
    ckpt = pretrained_checkpoint(datamodule, tmp_path / "sft.ckpt")
    with pytest.raises(RecpostError, match="not a reward-model checkpoint"):
        load_reward_model(str(ckpt), datamodule.item_map_hash)


def test_a_reward_model_of_another_catalog_is_rejected(datamodule, tmp_path):
    ckpt = reward_model_checkpoint(datamodule, tmp_path / "rm.ckpt", steps=0)
    with pytest.raises(RecpostError, match="another item catalog"):
        load_reward_model(str(ckpt), "0123456789abcdef")


def test_a_loaded_reward_model_is_frozen_and_predicts_like_the_saved_one(datamodule, tmp_path):
    ckpt = reward_model_checkpoint(datamodule, tmp_path / "rm.ckpt")
    rm = load_reward_model(str(ckpt), datamodule.item_map_hash)
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(rm.head.item_bias, state["head.item_bias"])


def test_eval_reward_model_adds_its_mean_score_of_the_top_10(datamodule, tmp_path):
    ckpt = reward_model_checkpoint(datamodule, tmp_path / "rm.ckpt")
    sft = build(SFT, datamodule, eval_reward_model=str(ckpt)).eval()
    assert sft.extra_metric_names() == ("eval_rm_reward@10",)
    assert not any(k.startswith("_frozen") or "eval_reward" in k for k in sft.state_dict())
    batch = datamodule.eval_batch(list(range(16)), "val")
    with torch.no_grad():
        scores = sft.catalog_scores(batch)
        value = sft.extra_metrics(batch, scores)["eval_rm_reward@10"]
        rewards = load_reward_model(str(ckpt), datamodule.item_map_hash).predict_rewards(
            batch["input_items"], batch["input_ratings"])
    expected = rewards.gather(1, scores.topk(10, dim=1).indices).mean(1)
    assert torch.allclose(value, expected)


@pytest.mark.slow
def test_recpost_fit_trains_a_reward_model_selected_on_validation_rmse(tiny_config):
    dm = tiny_datamodule(tiny_config.parent)  # the same CSV as the config: the same catalog
    pre = pretrained_checkpoint(dm, tiny_config.parent / "pre.ckpt")
    root = tiny_config.parent / "rm"
    out = recpost("fit", "--config", str(tiny_config), "--config", str(CONFIG), "--model.init_args.init_from", str(pre),
                  "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root))
    assert out.returncode == 0, out.stderr[-3000:]
    run, rows = last_metrics(root)
    assert (run.best_checkpoint).is_file()
    val = next(r for r in rows if r.get("val/rmse"))
    for name in ("rmse", "mae", "rmse_global_mean", "rmse_item_mean", "rmse_user_mean"):
        assert math.isfinite(float(val[f"val/{name}"]))
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r.get("train/loss"))
    config = yaml.safe_load(run.config.read_text())
    assert (config["checkpoint"]["monitor"], config["checkpoint"]["mode"]) == ("val/rmse", "min")


def test_reward_check_finds_a_model_identical_to_itself_and_a_resampled_one_less_so(tmp_path):
    from recpost.data import Simulator
    from recpost.data.simulator import WorldConfig
    from recpost.diagnostics.reward_check import compare

    dm = RecDataModule(Simulator(WorldConfig(n_users=60, n_items=80), min_seq_len=5, max_seq_len=9), max_len=8,
                       cache_dir=str(tmp_path / "cache"))
    first = reward_model_checkpoint(dm, tmp_path / "a.ckpt", steps=1)
    boot = RecDataModule(dm.source, max_len=8, cache_dir=str(tmp_path / "cache"), train_users="bootstrap")
    second = reward_model_checkpoint(boot, tmp_path / "b.ckpt", steps=1, seed=1)
    same = compare(dm, str(first), str(first))
    assert same["test_targets/error_corr"] == pytest.approx(1.0) and same["catalog/error_corr"] == pytest.approx(1.0)
    assert same["top10/rmse_vs_true_reward_model"] == same["top10/rmse_vs_true_evaluator"]
    other = compare(dm, str(first), str(second))
    assert other["catalog/error_corr"] < 1.0 - 1e-4
