"""Large catalogs: sampled softmax for SFT/ExpSFT training, chunked catalog scoring for evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from recpost.data import RecDataModule, Simulator
from recpost.data.simulator import WorldConfig
from recpost.core.errors import RecpostError
from recpost.evaluation import CatalogRanking, RankingMetrics, mask_items, rank_in_chunks
from recpost.methods import SFT, ExpSFT, RewardModel
from recpost.methods.losses import (
    exp_reward_weights,
    popularity_log_q,
    sample_negatives,
    sampled_softmax_cross_entropy,
)
from tests.helpers import build, init_reward_biases, reward_model_checkpoint, tiny_datamodule


@pytest.fixture
def datamodule(tmp_path: Path) -> RecDataModule:
    return tiny_datamodule(tmp_path)


def _eval_batches(dm: RecDataModule, split: str = "val", size: int = 24) -> list[dict[str, torch.Tensor]]:
    n = dm.data.n_users
    return [dm.eval_batch(list(range(s, min(s + size, n))), split) for s in range(0, n, size)]


def _evaluate(module, batches, chunk: int | None, truth=None) -> dict[str, float]:
    module.hparams.score_chunk_size = chunk
    module._truth = truth
    names = (tuple(truth.metric_names) if truth else ()) + module.extra_metric_names()
    metrics = RankingMetrics(module.hparams.n_items, extra=names)
    with torch.no_grad():
        for batch in batches:
            module._eval_step(batch, metrics)
    return metrics.compute()


# ----------------------------------------------------------------------------------- sampled softmax loss
def test_sampled_loss_matches_a_hand_computed_value_with_log_q_and_an_accidental_hit():
    # One target (item 5, logit 2.0, q = 0.5); negatives 2, 5, 7 with logits 1.0, 3.0, 0.5 and q 0.2, 0.5, 0.3.
    # Negative 5 is the target itself: removed. Every remaining logit is corrected by -log q.
    q_neg = torch.tensor([0.2, 0.5, 0.3])
    ce = sampled_softmax_cross_entropy(
        target_logits=torch.tensor([2.0]), negative_logits=torch.tensor([[1.0, 3.0, 0.5]]), targets=torch.tensor([5]),
        negatives=torch.tensor([2, 5, 7]), log_q_targets=torch.tensor([0.5]).log(), log_q_negatives=q_neg.log(),
    )
    pos, neg_a, neg_b = 2.0 - math.log(0.5), 1.0 - math.log(0.2), 0.5 - math.log(0.3)
    expected = math.log(math.exp(pos) + math.exp(neg_a) + math.exp(neg_b)) - pos
    assert ce.tolist() == pytest.approx([expected], rel=1e-6)


def test_uniform_log_q_cancels_to_a_plain_softmax_over_the_target_and_the_negatives():
    target, negative = torch.tensor([0.3, -1.0]), torch.tensor([[0.1, 2.0], [0.5, -0.5]])
    negatives = torch.tensor([4, 9])
    log_q = torch.tensor(-math.log(40.0))
    ce = sampled_softmax_cross_entropy(target, negative, torch.tensor([1, 2]), negatives, log_q.expand(2), log_q.expand(2))
    logits = torch.cat([target[:, None], negative], dim=1)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long), reduction="none"))


def test_popularity_sampler_draws_in_proportion_to_smoothed_training_counts():
    counts = torch.tensor([0, 99, 0, 48, 149])  # item 0 is padding; +1 each: 100, 1, 49, 150 of 300
    log_q = popularity_log_q(counts)
    assert log_q.exp().tolist() == pytest.approx([0.0, 100 / 300, 1 / 300, 49 / 300, 150 / 300], rel=1e-6)
    negatives, log_q_neg = sample_negatives(30_000, 4, log_q, generator=torch.Generator().manual_seed(0))
    assert negatives.min() >= 1 and torch.equal(log_q_neg, log_q[negatives])
    share = torch.bincount(negatives, minlength=5).float() / len(negatives)
    assert share[1:].tolist() == pytest.approx([100 / 300, 1 / 300, 49 / 300, 150 / 300], abs=0.01)


def test_uniform_sampler_never_draws_padding_and_has_constant_log_q():
    negatives, log_q = sample_negatives(5000, 7, generator=torch.Generator().manual_seed(0))
    assert negatives.min() == 1 and negatives.max() == 7
    assert torch.allclose(log_q, torch.full_like(log_q, -math.log(7)))


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_as_many_negatives_as_items_is_exactly_the_full_softmax(datamodule, sampler):
    batch = datamodule.train_batch(list(range(32)))
    full = build(SFT, datamodule)
    every_item = build(SFT, datamodule, softmax="sampled", num_negatives=datamodule.n_items, negative_sampler=sampler)
    assert not every_item.sampled
    losses = []
    for module in (full, every_item):
        torch.manual_seed(0)  # the same dropout masks
        losses.append(module.training_loss(batch)[0])
    assert torch.equal(*losses)


def test_sampled_softmax_loss_is_finite_and_differs_from_the_full_one(datamodule):
    batch = datamodule.train_batch(list(range(32)))
    full, sampled = build(SFT, datamodule).eval(), build(SFT, datamodule, softmax="sampled", num_negatives=8).eval()
    full, sampled = full.training_loss(batch)[0], sampled.training_loss(batch)[0]
    assert torch.isfinite(sampled) and sampled < full  # 9 candidates instead of 40 items


def test_lambda_to_infinity_matches_sft_under_the_same_sampled_softmax(datamodule):
    from tests.helpers import assert_same_loss_and_gradients

    batch = datamodule.train_batch(list(range(32)))
    sft = build(SFT, datamodule, softmax="sampled", num_negatives=8)
    exp = build(ExpSFT, datamodule, softmax="sampled", num_negatives=8, lam=1e8)
    assert_same_loss_and_gradients(sft, exp, batch, seed=123)  # the same negatives for both


def test_exp_sft_weights_multiply_the_sampled_cross_entropy(datamodule):
    batch = datamodule.train_batch(list(range(32)))
    module = build(ExpSFT, datamodule, lam=0.5, softmax="sampled", num_negatives=8)
    torch.manual_seed(7)
    ce, rewards = module.next_item_cross_entropy(batch)
    torch.manual_seed(7)
    loss, logs = module.training_loss(batch)
    assert torch.allclose(loss, (exp_reward_weights(rewards, 0.5) * ce).mean())
    assert torch.allclose(logs["ce"], ce.mean())


def test_sampled_loss_stays_fp32_under_cpu_bf16_autocast(datamodule):
    module = build(ExpSFT, datamodule, lam=1e-3, softmax="sampled", num_negatives=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, _ = module.next_item_cross_entropy(datamodule.train_batch(list(range(16))))
        loss, _ = module.training_loss(datamodule.train_batch(list(range(16))))
    assert ce.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_popularity_counts_come_from_the_training_interactions_at_fit_start(datamodule):
    counts = datamodule.train_item_counts()
    d = datamodule.data
    assert counts[0] == 0 and counts.sum() == len(d.item) - 2 * d.n_users  # validation and test targets left out
    module = build(SFT, datamodule, softmax="sampled", num_negatives=8, negative_sampler="popularity")
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    assert torch.allclose(module.negative_log_q, popularity_log_q(torch.from_numpy(counts)))


def test_popularity_sampler_without_counts_is_one_clear_error(datamodule):
    module = build(SFT, datamodule, softmax="sampled", num_negatives=8, negative_sampler="popularity")
    with pytest.raises(RecpostError, match="no item counts yet.*set_item_counts"):
        module.training_loss(datamodule.train_batch(list(range(8))))


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_num_negatives_below_one_or_not_an_integer_is_rejected(datamodule, value):
    with pytest.raises(RecpostError, match="model.num_negatives must be an integer >= 1"):
        build(SFT, datamodule, softmax="sampled", num_negatives=value)


def test_an_unknown_negative_sampler_is_rejected(datamodule):
    with pytest.raises(RecpostError, match="model.negative_sampler must be one of uniform, popularity .got 'zipf'"):
        build(ExpSFT, datamodule, softmax="sampled", negative_sampler="zipf")


def test_an_unknown_softmax_is_rejected(datamodule):
    with pytest.raises(RecpostError, match="model.softmax must be one of full, sampled"):
        build(SFT, datamodule, softmax="hierarchical")


@pytest.mark.parametrize("value", [0, -1])
def test_a_score_chunk_size_below_one_is_rejected(datamodule, value):
    with pytest.raises(RecpostError, match="model.score_chunk_size must be an integer >= 1"):
        build(SFT, datamodule, score_chunk_size=value)


# ----------------------------------------------------------------------------------- chunked scoring
def _ranking_of(scores: torch.Tensor, target: torch.Tensor, history: torch.Tensor | None, k: int = 10) -> CatalogRanking:
    masked = mask_items(scores.clone(), history) if history is not None else scores
    return CatalogRanking.from_scores(masked, target, k)


@pytest.mark.parametrize("chunk", [1, 3, 10, 16, 41, 100])
def test_chunked_ranking_equals_the_whole_matrix_with_ties_and_masked_targets(chunk):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (8, 41), generator=g).float()  # many ties
    scores[:, 0] = float("-inf")  # padding
    target = torch.randint(1, 41, (8,), generator=g)
    history = torch.randint(0, 41, (8, 6), generator=g)
    history[0, 2] = target[0]  # a target the user already had: masked, so it ranks last
    expected = _ranking_of(scores, target, history)
    got = rank_in_chunks(lambda cols: scores[:, cols].clone(), 41, chunk, target=target, history=history)
    assert torch.equal(got.rank, expected.rank)
    assert got.rank[0] == 40
    assert torch.equal(got.top_scores, expected.top_scores)  # which of several tied items is unspecified


def test_chunked_ranking_recounts_when_the_target_score_estimate_is_off_in_the_last_bit():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 30, generator=g)
    scores[:, 0] = float("-inf")
    target = torch.randint(1, 30, (6,), generator=g)
    scores[torch.arange(6), (target % 29) + 1] = scores[torch.arange(6), target]  # exact ties with the target

    def score_columns(cols):  # item-id columns (the estimate) round differently from chunks
        out = scores[:, cols].clone()
        return out if isinstance(cols, slice) else torch.nextafter(out, torch.full_like(out, float("inf")))

    got = rank_in_chunks(score_columns, 30, 7, target=target)
    assert torch.equal(got.rank, _ranking_of(scores, target, None).rank)


def test_chunked_ranking_without_a_target_gives_the_top_k():
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    got = rank_in_chunks(lambda cols: scores[:, cols].clone(), 50, 8, k=5)
    assert got.rank is None and torch.equal(got.top_items, scores.topk(5, dim=1).indices)


@pytest.mark.parametrize("mask_history", [True, False])
def test_chunked_evaluation_metrics_equal_the_unchunked_ones(datamodule, tmp_path, mask_history):
    rm = reward_model_checkpoint(datamodule, tmp_path / "rm.ckpt", steps=1)
    module = build(SFT, datamodule, mask_history=mask_history, eval_reward_model=str(rm)).eval()
    batches = _eval_batches(datamodule)
    whole = _evaluate(module, batches, None)
    assert "eval_rm_reward@10" in whole
    for chunk in (7, 16, datamodule.n_items + 1, 1000):
        assert _evaluate(module, batches, chunk) == whole


def test_chunked_reward_model_ranking_equals_its_whole_catalog_scores(datamodule):
    rm = build(RewardModel, datamodule).eval()
    init_reward_biases(rm, datamodule)
    rm.hparams.score_chunk_size = 9
    for batch in _eval_batches(datamodule, "test"):
        with torch.no_grad():
            expected = CatalogRanking.from_scores(rm.catalog_scores(batch), batch["target_item"])
            got = rm.rank_catalog(batch)
        assert torch.equal(got.rank, expected.rank) and torch.equal(got.top_scores, expected.top_scores)


def test_chunked_prediction_equals_the_unchunked_one(datamodule):
    module = build(SFT, datamodule).eval()
    batch = datamodule.eval_batch(list(range(20)), "predict")
    with torch.no_grad():
        whole = module.predict_step(batch, 0, k=5)
        module.hparams.score_chunk_size = 6
        chunked = module.predict_step(batch, 0, k=5)
    # The same items; scores to the last bit only up to BLAS rounding (a [B, 6] matmul may round a dot
    # product differently from the [B, n_items + 1] one).
    assert torch.equal(whole["items"], chunked["items"])
    assert torch.allclose(whole["scores"], chunked["scores"], rtol=1e-6, atol=1e-6)


def test_chunked_evaluation_keeps_the_simulator_ground_truth_metrics(tmp_path):
    sim = Simulator(WorldConfig(n_users=60, n_items=80, seed=0), min_seq_len=5, max_seq_len=9)
    dm = RecDataModule(sim, max_len=8, eval_batch_size=32, cache_dir=str(tmp_path / "cache"))
    module = build(SFT, dm).eval()
    batches = _eval_batches(dm, size=32)
    whole = _evaluate(module, batches, None, dm.ground_truth)
    chunked = _evaluate(module, batches, 20, dm.ground_truth)  # ground truth: a few users' rows at a time
    assert whole.keys() == chunked.keys() and "true_reward@10" in whole
    assert chunked == pytest.approx(whole, rel=1e-5)
