"""Judges (``judges``): judge_reward@10, its spread across judges, their agreement with the training RM
(``judge_reference``: rank correlation and top-10 overlap), and bad settings."""

from __future__ import annotations

import csv
import math
import shutil
import statistics
import sys

import pytest
import torch

from recpost.models.checkpoint import load_reward_model
from recpost.core.errors import RecpostError
from recpost.evaluation import (
    CatalogRanking, RankingMetrics, judge_rewards, judge_spread, judge_values, rank_correlation, top_overlap,
)
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


# ----------------------------------------------------------------------------------- agreement with the training RM
class TableJudge:
    """A judge whose predicted ratings are a fixed table ``[B, V + 1]`` (the batch's users in order)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def predict_rewards(self, input_items, input_ratings, candidates=None, input_timestamps=None):
        return self.table if candidates is None else self.table.gather(1, candidates)

    def column_scorer(self, input_items, input_ratings, input_timestamps=None):
        def score(columns):
            out = self.table[:, columns].clone()
            if isinstance(columns, slice) and not columns.start:
                out[:, 0] = float("-inf")
            return out
        return score


def test_spearman_is_one_for_the_same_order_and_minus_one_for_the_reverse():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.3, 0.1, 0.2, 0.4]])
    assert rank_correlation(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert rank_correlation(a, 10 * a + 3).tolist() == pytest.approx([1.0, 1.0])  # only the order counts
    assert rank_correlation(a, -a).tolist() == pytest.approx([-1.0, -1.0])
    # by hand, ties sharing their mean rank: ranks (0, 1, 2, 3) against (0.5, 0.5, 2, 3)
    tied = rank_correlation(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[5.0, 5.0, 6.0, 7.0]]))
    ra, rb = torch.tensor([-1.5, -0.5, 0.5, 1.5]), torch.tensor([-1.0, -1.0, 0.5, 1.5])
    assert tied.item() == pytest.approx(float((ra * rb).sum() / (ra.norm() * rb.norm())))
    assert rank_correlation(a[:1], torch.ones(1, 4)).tolist() == [0.0]  # a constant side has no order


def test_top_overlap_counts_the_shared_items():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert top_overlap(a, a).tolist() == [1.0, 1.0]
    assert top_overlap(a, torch.tensor([[4, 3, 2, 1], [5, 6, 7, 8]])).tolist() == [1.0, 0.0]
    assert top_overlap(a, torch.tensor([[9, 1, 2, 8], [4, 9, 9, 9]])).tolist() == [0.5, 0.25]


def test_a_judge_identical_to_the_reference_agrees_fully_and_a_reversed_one_not_at_all():
    torch.manual_seed(0)
    n_items = 30
    table = torch.rand(4, n_items + 1) * 4 + 1  # the training RM's predicted ratings [B, V + 1]
    reference, same, reversed_ = TableJudge(table), TableJudge(table.clone()), TableJudge(6 - table)
    batch = {"input_items": torch.ones(4, 3, dtype=torch.long), "input_ratings": torch.ones(4, 3)}
    top = torch.stack([torch.randperm(n_items)[:10] + 1 for _ in range(4)])  # a policy's top 10 [B, 10]
    history = torch.tensor([[1, 2], [3, 0], [0, 0], [5, 6]])
    values = judge_values([same, reversed_], batch, top, reference, n_columns=n_items + 1, chunk_size=7, history=history)
    assert values["judge0_rank_corr@10"].tolist() == pytest.approx([1.0] * 4)
    assert values["judge1_rank_corr@10"].tolist() == pytest.approx([-1.0] * 4)
    assert values["judge_rank_corr@10"].tolist() == pytest.approx([0.0] * 4)  # the mean over the two judges
    assert values["judge0_rm_overlap@10"].tolist() == [1.0] * 4
    # the reversed judge's top 10 is the RM's bottom 10 of the 28-30 unmasked items: none shared
    assert values["judge1_rm_overlap@10"].tolist() == [0.0] * 4
    assert values["judge0_reward@10"].tolist() == pytest.approx(table.gather(1, top).mean(1).tolist())
    # the whole catalog at once ranks the same top 10s as 7 columns at a time
    whole = judge_values([same, reversed_], batch, top, reference, n_columns=n_items + 1, history=history)
    assert all(torch.equal(whole[k], values[k]) for k in values)
    assert judge_values([same], batch, top)["judge_reward@10"].shape == (4,)  # no reference: ratings only


def test_a_policy_with_judges_and_a_judge_reference_logs_the_agreement(tmp_path):
    dm = tiny_datamodule(tmp_path)
    rm = reward_model_checkpoint(dm, tmp_path / "rm.ckpt", seed=7)
    judges = [str(reward_model_checkpoint(dm, tmp_path / f"judge{k}.ckpt", seed=k)) for k in range(2)]
    sft = build(SFT, dm, judges=judges, judge_reference=str(rm)).eval()
    names = sft.extra_metric_names()
    assert {"judge_rank_corr@10", "judge0_rank_corr@10", "judge1_rm_overlap@10", "judge_rm_overlap@10"} <= set(names)
    batch = dm.eval_batch(list(range(16)), "test")
    with torch.no_grad():
        values = sft.extra_metrics(batch, sft.catalog_scores(batch))
    assert set(names) == set(values) and all(v.shape == (16,) for v in values.values())
    assert all(-1.0 <= float(v.min()) and float(v.max()) <= 1.0 for k, v in values.items() if "corr" in k)
    # a judge that is a copy of the training RM (another file, the same weights) agrees fully with it
    copy = tmp_path / "copy_of_rm.ckpt"
    shutil.copy(rm, copy)
    itself = build(SFT, dm, judges=[str(copy)], judge_reference=str(rm)).eval()
    with torch.no_grad():
        values = itself.extra_metrics(batch, itself.catalog_scores(batch))
    assert values["judge0_rank_corr@10"].tolist() == pytest.approx([1.0] * 16)
    assert values["judge0_rm_overlap@10"].tolist() == [1.0] * 16
    with pytest.raises(RecpostError, match="is also one of model.judges"):
        SFT.check_settings(judges=[str(rm)], judge_reference=str(rm))
