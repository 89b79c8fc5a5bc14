"""The simulator's knobs that make a reward model unreliable: each changes what it claims, and only that."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch

from recpost.data import RecDataModule
from recpost.data.simulator import BanditWorld, Simulator, SimWorld, WorldConfig
from recpost.evaluation import mask_items
from recpost.evaluation.rm_reliability import spearman


def _small(n_users: int = 300, n_items: int = 120, min_seq_len: int = 8, max_seq_len: int = 16, **world) -> Simulator:
    return Simulator(WorldConfig(n_users=n_users, n_items=n_items, **{"seed": 1, **world}), min_seq_len, max_seq_len)


def _logit(r_star: torch.Tensor) -> torch.Tensor:
    """Back from the 1..5 scale to the logit of ``r*`` (``r* = 1 + 4 sigmoid(logit)``)."""
    return torch.logit((r_star.double() - 1.0) / 4.0)


def _digest(data: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in ("user", "item", "step", "rating"):  # integers (whole stars): exact on any CPU
        h.update(data[key].to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------- defaults change nothing
@pytest.mark.parametrize("world, lengths, digest, r_star_sum", [
    (WorldConfig(n_users=120, n_items=80, seed=1), (5, 12), "a272e99361f5a898", 3816.869609951973),
    (WorldConfig(n_users=150, n_items=300, candidates=40, heteroscedasticity=1.0, noise_std=0.7, seed=2), (5, 20),
     "a64d1ff4c92a9f7a", 6397.998821973801),
], ids=["catalog", "candidates+heteroscedastic"])
def test_default_knobs_generate_exactly_the_data_of_before(world, lengths, digest, r_star_sum):
    # Stored from the code before these knobs existed: every cached world and every published number stays.
    data = Simulator(world, *lengths).generate()
    assert _digest(data) == digest
    assert float(data["r_star"].double().sum()) == pytest.approx(r_star_sum, rel=1e-9)
    assert bool(data["rated"].all())


def test_a_later_setting_enters_the_cache_key_only_when_set():
    default, changed = _small().fingerprint(), _small(exposure_concentration=1.0).fingerprint()
    assert "exposure_concentration" not in default and "feedback_rate" not in default
    assert changed == {**default, "exposure_concentration": 1.0}
    assert _small(feedback_rate=1.0).fingerprint() == default  # the default spelled out: the same data, same key


# ----------------------------------------------------------------------------------- exposure
def test_exposure_concentration_leaves_tail_items_fewer_ratings():
    counts = {}
    for ec in (0.0, 1.5):
        sim = _small(exposure_concentration=ec)
        counts[ec] = torch.bincount(sim.generate()["item"], minlength=sim.world.n_items).float()
    tail = sim.world.rarity > 0.5  # the less popular half (popularity ranks do not depend on the knob)
    assert counts[1.5][tail].mean() < 0.6 * counts[0.0][tail].mean()
    assert (counts[1.5][tail] < 3).float().mean() > (counts[0.0][tail] < 3).float().mean() + 0.1
    assert counts[1.5].sum() == counts[0.0].sum()  # the same number of consumptions, moved to the head


def test_exposure_rarity_follows_how_often_items_are_consumed():
    sim = _small(n_users=600, heteroscedasticity=1.0, rarity_from="exposure")
    counts = torch.bincount(sim.generate()["item"], minlength=sim.world.n_items).float()
    by_popularity = SimWorld(dataclasses.replace(sim.world.config, rarity_from="popularity")).rarity
    assert spearman(sim.world.rarity, counts) < -0.85  # rare = rarely consumed
    assert spearman(sim.world.rarity, counts) < spearman(by_popularity, counts) - 0.2


def test_heteroscedastic_noise_by_exposure_is_larger_for_rarely_exposed_items():
    world = SimWorld(WorldConfig(noise_std=0.3, heteroscedasticity=1.0, round_to_stars=False, rarity_from="exposure"))
    most, least = world.log_exposure().argmax(), world.log_exposure().argmin()
    n, gen = 100_000, torch.Generator().manual_seed(0)
    std = [(world.observe(torch.full((n,), 3.0), torch.full((n,), int(i)), gen) - 3.0).std().item() for i in (most, least)]
    assert std[0] == pytest.approx(0.3, rel=0.03)
    assert std[1] == pytest.approx(0.6, rel=0.03)


# ----------------------------------------------------------------------------------- feedback
def test_feedback_rate_is_the_share_of_consumptions_that_are_rated_and_logged():
    full, sparse = _small().generate(), _small(feedback_rate=0.3)
    data = sparse.generate()
    n = len(data["rated"])
    share = data["rated"].float().mean().item()
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    for key in ("user", "item", "step", "r_star", "rating"):  # its own random stream: nothing else moves
        assert torch.equal(data[key], full[key])
    table = sparse.load()
    assert table.num_rows == int(data["rated"].sum())
    assert table.column("rating").to_pylist() == data["rating"][data["rated"]].double().tolist()


def test_shuffled_ratings_keep_their_distribution_and_lose_the_true_reward():
    honest, placebo = _small(n_users=600).generate(), _small(n_users=600, shuffle_ratings=True).generate()
    n = len(placebo["rating"])
    assert torch.equal(placebo["r_star"], honest["r_star"])
    assert torch.equal(placebo["rating"].sort().values, honest["rating"].sort().values)  # the same multiset
    assert torch.corrcoef(torch.stack([honest["rating"], honest["r_star"]]))[0, 1] > 0.6
    assert abs(torch.corrcoef(torch.stack([placebo["rating"], placebo["r_star"]]))[0, 1]) < 4 / math.sqrt(n)


# ----------------------------------------------------------------------------------- misspecification
def test_satiation_lowers_the_logit_by_the_share_of_the_genre_in_the_window():
    world = SimWorld(WorldConfig(n_users=5, n_items=200, latent_dim=4, satiation=2.0, satiation_window=4))
    plain = SimWorld(WorldConfig(n_users=5, n_items=200, latent_dim=4))
    genre = world.genre
    g, h = 0, 1
    of_g, of_h = torch.nonzero(genre == g).flatten(), torch.nonzero(genre == h).flatten()
    users = torch.tensor([0, 0, 0, 0])
    pad = -1
    history = torch.tensor([
        [pad, pad, of_g[0], of_g[1], of_g[2], of_g[3]],   # a whole window of genre g (left padding)
        [of_h[0], of_h[1], of_g[0], of_g[1], pad, pad],   # half g, half h (right padding)
        [of_g[0], pad, pad, pad, pad, pad],               # one item: a quarter of the window
        [of_g[0], of_g[1], of_g[2], of_g[3], of_h[0], of_h[1]],  # only the latest 4 count: g g h h
    ])
    drop = _logit(plain.true_reward(users)) - _logit(world.true_reward(users, history=history))  # [4, I]
    expected = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.5, 0.0], [1.0, 1.0]], dtype=torch.float64)
    for row in range(4):
        assert torch.allclose(drop[row, genre == g], expected[row, 0], atol=1e-4)
        assert torch.allclose(drop[row, genre == h], expected[row, 1], atol=1e-4)
        assert torch.allclose(drop[row, genre > 1], torch.tensor(0.0, dtype=torch.float64), atol=1e-4)
    assert torch.equal(world.true_reward(users), plain.true_reward(users))  # no history, no satiation


def test_generated_true_rewards_follow_each_users_history_under_satiation():
    sim = _small(n_users=60, n_items=80, min_seq_len=5, max_seq_len=12, satiation=1.5, satiation_window=3)
    data = sim.generate()
    n = len(data["item"])
    history = torch.full((n, 12), -1)  # [N, L]: the items the user had before each consumption
    for idx in range(n):
        earlier = torch.nonzero((data["user"] == data["user"][idx]) & (data["step"] < data["step"][idx])).flatten()
        history[idx, :len(earlier)] = data["item"][earlier]
    r = sim.world.true_reward(data["user"], history=history)  # [N, I]
    assert torch.allclose(r[torch.arange(n), data["item"]], data["r_star"], atol=1e-5)
    assert not torch.allclose(sim.world.true_reward(data["user"])[torch.arange(n), data["item"]], data["r_star"])


def test_taste_interaction_adds_a_unit_variance_product_of_the_two_taste_halves():
    cfg = dict(n_users=2000, n_items=1000, latent_dim=8)  # 2M pairs: the sample std is within 2% of the truth
    plain, mixed = SimWorld(WorldConfig(**cfg)), SimWorld(WorldConfig(**cfg, taste_interaction=1.5))
    users = torch.arange(2000)
    x, v = plain.user_factors.double(), plain.item_factors.double()
    product = (x[:, :4] @ v[:, :4].T) * (x[:, 4:] @ v[:, 4:].T)  # [U, I]: halves of variance 1/2 each
    assert product.std().item() == pytest.approx(0.5, rel=0.05)  # so the world's scale factor 2 is right
    added = _logit(mixed.true_reward(users)) - _logit(plain.true_reward(users))
    inside = (mixed.true_reward(users) - 3).abs() < 1.9  # away from the ends, where fp32 r* loses the logit
    assert torch.allclose(added[inside], 1.5 * 2 * product[inside], atol=2e-3)


def test_taste_interaction_raises_the_rank_of_the_true_reward_beyond_a_bilinear_model():
    def rank(world: SimWorld) -> int:
        s = torch.linalg.svdvals(_logit(world.true_reward(torch.arange(world.n_users))))  # [U, I] logits of r*
        return int((s > 1e-4 * s[0]).sum())
    cfg = dict(n_users=80, n_items=80, latent_dim=8)
    assert rank(SimWorld(WorldConfig(**cfg))) == 9  # taste (8) + quality (1): what a bilinear head can fit
    assert rank(SimWorld(WorldConfig(**cfg, taste_interaction=1.0))) == 9 + 4 * 4  # + every product of halves


def test_bandit_world_rewards_see_the_context_history():
    worlds = [BanditWorld(n_contexts=6, n_actions=30, history_len=4, satiation=s) for s in (0.0, 3.0)]
    assert torch.equal(worlds[0].pi_beta, worlds[1].pi_beta)  # pi_beta ignores satiation
    assert bool((worlds[1].true_reward <= worlds[0].true_reward + 1e-6).all())
    assert bool((worlds[1].true_reward < worlds[0].true_reward - 1e-3).any())


# ----------------------------------------------------------------------------------- what ratings estimate
@pytest.mark.parametrize("round_to_stars", [True, False])
def test_expected_rating_is_the_mean_of_rounded_clipped_noisy_ratings(round_to_stars):
    world = SimWorld(WorldConfig(noise_std=0.8, heteroscedasticity=0.5, round_to_stars=round_to_stars))
    r_star = torch.tensor([1.05, 2.3, 3.5, 4.4, 4.95])
    items = torch.tensor([0, 1, 2, 3, 4])
    n = 200_000
    draws = world.observe(r_star.repeat(n), items.repeat(n), torch.Generator().manual_seed(0)).view(n, 5)
    exact = world.expected_rating(r_star, items)
    assert torch.allclose(draws.double().mean(0), exact.double(), atol=4 * 2.0 / math.sqrt(n))
    assert exact[0] > r_star[0] and exact[-1] < r_star[-1]  # clipping pulls the ends inwards


# ----------------------------------------------------------------------------------- ground truth
def _val_batch(sim: Simulator, tmp_path):
    dm = RecDataModule(sim, max_len=10, batch_size=32, eval_batch_size=64, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    return next(iter(dm.val_dataloader())), dm.ground_truth


def test_under_satiation_the_oracle_is_the_best_item_after_the_history(tmp_path):
    sim = _small(n_users=60, n_items=100, min_seq_len=5, max_seq_len=12, satiation=3.0, satiation_window=3)
    batch, truth = _val_batch(sim, tmp_path)
    after = truth.catalog_reward(batch["user_index"], batch["history_items"])  # [B, V]: r* given the history
    before = sim.true_reward(truth.world_user[batch["user_index"]], truth.world_item[1:])  # r* of a fresh user
    assert bool((after <= before + 1e-6).all()) and bool((after < before - 1e-3).any())
    scores = torch.full((len(after), after.shape[1] + 1), float("-inf"))
    scores[:, 1:] = after
    out = truth.evaluate(batch, mask_items(scores, batch["history_items"]))
    assert torch.allclose(out["regret@10"], torch.zeros_like(out["regret@10"]), atol=1e-5)


def test_catalog_behaviour_log_probs_are_the_world_propensities(tmp_path):
    sim = _small(n_users=40, n_items=300, min_seq_len=5, max_seq_len=8)  # not every item reaches the catalog
    batch, truth = _val_batch(sim, tmp_path)
    log_p = truth.catalog_behavior_logits(batch["user_index"], batch["history_items"])  # [B, V]
    world_probs = sim.world.behavior_probs(truth.world_user[batch["user_index"]], truth.world_item[batch["history_items"]])
    assert torch.allclose(log_p.exp(), world_probs[:, truth.world_item[1:]], atol=1e-6)
    assert bool((log_p.exp().sum(1) <= 1 + 1e-5).all())
    target = log_p.gather(1, batch["target_item"][:, None] - 1).exp()  # the logged next item: possible
    assert bool((target > 0).all())
