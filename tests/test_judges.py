"""Reward models as judges (``judges``): judge_reward@10, its spread across judges, and bad settings."""

from __future__ import annotations

import csv
import math
import statistics
import sys

import pytest
import torch

from recpost.models.checkpoint import load_reward_model
from recpost.core.errors import RecpostError
from recpost.evaluation import CatalogRanking, RankingMetrics, judge_rewards, judge_spread
from recpost.methods import PPO, SFT
from recpost.core.runs import latest_run
from tests.helpers import build, pretrained_checkpoint, reward_model_checkpoint, tiny_datamodule


def test_judge_reward_is_the_mean_over_judges_and_the_spread_their_std():
    # 2 judges x 3 users: each judge's mean rating of each user's top 10
    ratings = torch.tensor([[3.0, 4.0, 5.0],
                            [2.0, 4.0, 3.0]])
    per_user = judge_rewards(ratings)
    assert per_user["judge_reward@10"].tolist() == [2.5, 4.0, 4.0]
    assert per_user["judge0_reward@10"].tolist() == [3.0, 4.0, 5.0] and per_user["judge1_reward@10"].tolist() == [2.0, 4.0, 3.0]
    means = {"judge0_reward@10": 4.0, "judge1_reward@10": 3.0}  # each judge's mean over the users
    assert judge_spread(means, 2) == {"judge_reward@10_std": pytest.approx(math.sqrt(0.5))}  # Bessel: |4 - 3| / sqrt(2)
    assert judge_spread({"judge0_reward@10": 4.0}, 1) == {}  # one judge has no spread


def test_a_policy_scored_by_two_judges_reports_their_mean_rating_of_its_top_10(tmp_path):
    dm = tiny_datamodule(tmp_path)
    judges = [reward_model_checkpoint(dm, tmp_path / f"judge{k}.ckpt", seed=k) for k in range(2)]
    sft = build(SFT, dm, judges=[str(j) for j in judges]).eval()
    assert sft.extra_metric_names() == ("judge_reward@10", "judge0_reward@10", "judge1_reward@10")
    assert not any("judge" in k for k in sft.state_dict())  # held frozen, never saved
    metrics = RankingMetrics(dm.n_items, extra=sft.extra_metric_names())
    hand = [[], []]  # per judge, per user: the mean predicted rating of the user's top 10, by hand
    for users in (list(range(16)), list(range(16, 40))):
        batch = dm.eval_batch(users, "test")
        with torch.no_grad():
            scores = sft.catalog_scores(batch)  # [B, V + 1], history masked
            values = sft.extra_metrics(batch, scores)
            top = scores.topk(10, dim=1).indices  # [B, 10]
            for k, path in enumerate(judges):
                rm = load_reward_model(str(path), dm.item_map_hash)
                every = rm.predict_rewards(batch["input_items"], batch["input_ratings"])  # [B, V + 1]
                hand[k] += every.gather(1, top).mean(1).tolist()
        metrics.update(CatalogRanking.from_scores(scores, batch["target_item"]), batch["target_item"],
                       batch["target_rating"], batch["target_liked"], batch["user_index"], values)
    logged = sft.derived_metrics(metrics.compute())
    judge_means = [statistics.mean(h) for h in hand]  # each judge's mean over the 40 users
    assert logged["judge0_reward@10"] == pytest.approx(judge_means[0], abs=1e-5)
    assert logged["judge1_reward@10"] == pytest.approx(judge_means[1], abs=1e-5)
    assert logged["judge_reward@10"] == pytest.approx(statistics.mean(judge_means), abs=1e-5)
    assert logged["judge_reward@10_std"] == pytest.approx(statistics.stdev(judge_means), abs=1e-5)
    assert judge_means[0] != pytest.approx(judge_means[1], abs=1e-6)  # two different judges: a real spread


def test_without_judges_the_evaluation_is_unchanged(tmp_path):
    dm = tiny_datamodule(tmp_path)
    rm = reward_model_checkpoint(dm, tmp_path / "rm.ckpt")
    sft = build(SFT, dm, eval_reward_model=str(rm))
    assert sft.extra_metric_names() == ("eval_rm_reward@10",) and sft.judges == []
    assert sft.derived_metrics({"ndcg@10": 0.1}) == {"ndcg@10": 0.1}


@pytest.mark.parametrize("settings, message", [
    ({"judges": "a.ckpt"}, "model.judges must be a list of RewardModel checkpoints"),
    ({"judges": []}, "model.judges must be a list of RewardModel checkpoints"),
    ({"judges": ["a.ckpt", "./a.ckpt"]}, "lists"),
])
def test_bad_judges_are_one_clear_error(settings, message):
    with pytest.raises(RecpostError, match=message):
        SFT.check_settings(**settings)


def test_a_judge_that_is_the_reward_model_trained_against_is_refused():
    with pytest.raises(RecpostError, match="a reward model this method trains against; a judge must be trained "
                                           "independently"):
        PPO.check_settings(reward_model="rm.ckpt", judges=["judge.ckpt", "rm.ckpt"])


def test_a_missing_judge_checkpoint_is_one_line_naming_it(tmp_path):
    dm = tiny_datamodule(tmp_path)
    good = reward_model_checkpoint(dm, tmp_path / "judge0.ckpt")
    with pytest.raises(RecpostError, match=r"model\.judges\[1\]: checkpoint not found"):
        build(SFT, dm, judges=[str(good), str(tmp_path / "nope.ckpt")])
    with pytest.raises(RecpostError, match=r"model\.judges\[0\]: .* is not a reward-model checkpoint"):
        build(SFT, dm, judges=[str(pretrained_checkpoint(dm, tmp_path / "policy.ckpt"))])


def test_judges_given_at_test_time_score_a_trained_policy(tiny_config, monkeypatch):
    from recpost.cli.main import run_lightning_cli

    monkeypatch.setattr(sys, "argv", ["recpost"])
    dm = tiny_datamodule(tiny_config.parent)  # the same CSV as the config: the same catalog
    policy = pretrained_checkpoint(dm, tiny_config.parent / "policy.ckpt")
    judges = [str(reward_model_checkpoint(dm, tiny_config.parent / f"judge{k}.ckpt", seed=k)) for k in range(2)]
    root = tiny_config.parent / "eval"
    cli = run_lightning_cli(["test", "--config", str(tiny_config), "--ckpt_path", str(policy),
                             "--model.init_args.judges", f'["{judges[0]}", "{judges[1]}"]',
                             "--trainer.default_root_dir", str(root)])
    assert cli.model.hparams.judges == judges  # an evaluation setting: the command line wins over the checkpoint
    metrics = cli.trainer.callback_metrics
    assert {"test/judge_reward@10", "test/judge0_reward@10", "test/judge1_reward@10", "test/judge_reward@10_std"} <= set(metrics)
    assert float(metrics["test/judge_reward@10"]) == pytest.approx(
        (float(metrics["test/judge0_reward@10"]) + float(metrics["test/judge1_reward@10"])) / 2, abs=1e-5)
    with latest_run(root).per_user_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 101 and "judge_reward@10" in rows[0]  # every tiny user: for the paired bootstrap
