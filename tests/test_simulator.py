"""The simulator: a world with known true reward and behaviour policy, as data and as ground truth."""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace

from recpost.data import RecDataModule, Simulator, Source
from recpost.data.simulator import BanditWorld, SimulatorTruth, SimWorld, WorldConfig
from recpost.core.errors import RecpostError
from recpost.evaluation import mask_items

ROOT = Path(__file__).resolve().parents[1]
TRUTH_METRICS = (
    "true_reward@10", "true_ndcg@10", "regret@10", "true_reward_sampled", "true_reward@10_behavior",
    "true_reward@10_oracle",
)


def _sim(**settings) -> Simulator:
    """A Simulator from flat settings: the sequence lengths go to the source, the rest to its world."""
    lengths = {k: settings.pop(k) for k in ("min_seq_len", "max_seq_len") if k in settings}
    return Simulator(WorldConfig(**settings), **lengths)


def _small(**kw) -> Simulator:
    return _sim(**{"n_users": 120, "n_items": 80, "min_seq_len": 5, "max_seq_len": 12, "seed": 1, **kw})


def _datamodule(sim: Simulator, tmp_path, **kw) -> RecDataModule:
    return RecDataModule(sim, max_len=10, batch_size=32, eval_batch_size=64, cache_dir=str(tmp_path / "cache"), **kw)


def _chi_square_ok(observed: torch.Tensor, expected: torch.Tensor) -> bool:
    """Pearson chi-square over cells with expected >= 5, within ~6 sigma of its degrees of freedom."""
    keep = expected >= 5
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    return stat < dof + 6 * math.sqrt(2 * dof)


# ----------------------------------------------------------------------------------- generation
def test_same_seed_gives_the_same_table_and_another_seed_does_not():
    a, b, c = _small(seed=3).load(), _small(seed=3).load(), _small(seed=4).load()
    assert a.equals(b)
    assert not a.equals(c)


def test_load_returns_the_canonical_table_with_step_timestamps():
    sim = _small()
    table = sim.load()
    assert table.column_names == ["user_id", "item_id", "timestamp", "rating"]
    data = sim.generate()
    lengths = torch.bincount(data["user"])
    assert lengths.min() >= 5 and lengths.max() <= 12
    first = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    assert (data["step"][first] == 0).all()  # every user starts at step 0 ...
    assert table.column("timestamp").to_pylist() == data["step"].tolist()  # ... and counts up
    pairs = data["user"] * sim.world.n_items + data["item"]
    assert len(pairs.unique()) == len(pairs)  # sampled without replacement


@pytest.mark.parametrize("knobs", [
    {},  # whole catalog (exact mode)
    {"candidates": 30, "slate_size": 3, "slate_boost": 2.0},  # exposure sets and per-visit slates
], ids=["catalog", "candidates+slates"])
def test_sampled_actions_follow_the_computed_behaviour_probabilities(knobs):
    # One user sampled 40,000 times: at each step, the rows sharing the most common history are
    # draws from pi_beta(. | user, that history), which behavior_probs computes independently.
    world = SimWorld(WorldConfig(n_users=10, n_items=60, seed=2, **knobs))
    n, steps, user = 40_000, 3, 4
    seqs = world.sample_sequences(torch.full((n,), user), torch.full((n,), steps), block=0)  # [n, steps]
    for t in range(steps):
        prefix = seqs[:, :t]
        if t:
            prefixes, counts = prefix.unique(dim=0, return_counts=True)
            prefix = prefixes[counts.argmax()][None]  # [1, t]
        rows = (seqs[:, :t] == prefix).all(1)
        probs = world.behavior_probs(torch.tensor([user]), prefix[:1])[0]  # [I]
        chosen = seqs[rows, t]
        assert (probs[chosen] > 0).all()  # never an item pi_beta excludes
        observed = torch.bincount(chosen, minlength=world.n_items).double()
        assert _chi_square_ok(observed, probs.double() * int(rows.sum())), f"step {t}"


def test_behaviour_excludes_history_and_is_a_distribution():
    sim = _small()
    history = torch.tensor([[-1, -1, 4, 7], [1, 2, 3, 5]])
    probs = sim.world.behavior_probs(torch.tensor([0, 1]), history)
    assert torch.allclose(probs.sum(1), torch.ones(2))
    assert (probs[0, [4, 7]] == 0).all() and (probs[1, [1, 2, 3, 5]] == 0).all()
    assert (probs[0, :4] > 0).all()


def test_behaviour_consumes_items_users_do_not_like():
    data = Simulator(WorldConfig(n_users=300)).generate()  # default world, fewer users
    assert (data["r_star"] < 3).float().mean() > 0.05


# ----------------------------------------------------------------------------------- noise
def test_rating_noise_has_the_configured_mean_and_variance():
    world = SimWorld(WorldConfig(noise_std=0.4, round_to_stars=False))
    r_star = torch.full((200_000,), 3.0)
    items = torch.randint(world.n_items, (200_000,), generator=torch.Generator().manual_seed(0))
    noise = world.observe(r_star, items, torch.Generator().manual_seed(1)) - r_star
    assert abs(noise.mean().item()) < 0.005
    assert noise.var().item() == pytest.approx(0.4**2, rel=0.02)


def test_generated_ratings_are_the_true_reward_plus_noise():
    data = _small(n_users=2000, noise_std=0.1, round_to_stars=False).generate()
    inside = (data["r_star"] > 1.5) & (data["r_star"] < 4.5)  # clipping at 1 and 5 is > 5 sigma away
    noise = (data["rating"] - data["r_star"])[inside]
    assert abs(noise.mean().item()) < 0.005
    assert noise.std().item() == pytest.approx(0.1, rel=0.05)


def test_zero_noise_gives_the_true_reward():
    data = _small(noise_std=0.0, round_to_stars=False).generate()
    assert torch.equal(data["rating"], data["r_star"])


def test_heteroscedastic_noise_is_larger_for_rare_items():
    world = SimWorld(WorldConfig(noise_std=0.3, heteroscedasticity=1.0, round_to_stars=False))
    popular, rare = world.rarity.argmin(), world.rarity.argmax()
    n = 100_000
    gen = torch.Generator().manual_seed(0)
    std = {
        name: (world.observe(torch.full((n,), 3.0), torch.full((n,), int(i)), gen) - 3.0).std().item()
        for name, i in (("popular", popular), ("rare", rare))
    }
    assert std["popular"] == pytest.approx(0.3, rel=0.03)
    assert std["rare"] == pytest.approx(0.6, rel=0.03)


def test_rounded_ratings_are_whole_stars_from_1_to_5():
    ratings = _small(noise_std=1.5).generate()["rating"]
    assert torch.equal(ratings, ratings.round())
    assert set(ratings.unique().tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}


# ----------------------------------------------------------------------------------- ground truth
def _val_batch_and_truth(sim: Simulator, tmp_path) -> tuple[dict, SimulatorTruth, RecDataModule]:
    dm = _datamodule(sim, tmp_path)
    dm.setup("fit")
    return next(iter(dm.val_dataloader())), dm.ground_truth, dm


def _random_scores(batch: dict, n_items: int, seed: int = 0) -> torch.Tensor:
    scores = torch.randn(len(batch["user_index"]), n_items + 1, generator=torch.Generator().manual_seed(seed))
    return mask_items(scores, batch["history_items"])


def test_datamodule_serves_simulator_batches_and_ground_truth_metrics(tmp_path):
    sim = _small()
    batch, truth, dm = _val_batch_and_truth(sim, tmp_path)
    assert next(iter(dm.train_dataloader()))["input_items"].shape[0] == 32
    assert truth.metric_names == TRUTH_METRICS
    out = truth.evaluate(batch, _random_scores(batch, dm.n_items))
    assert set(out) == set(TRUTH_METRICS)
    for name, values in out.items():
        assert values.shape == (len(batch["user_index"]),) and torch.isfinite(values).all(), name
    assert ((out["true_ndcg@10"] >= 0) & (out["true_ndcg@10"] <= 1 + 1e-6)).all()
    assert (out["regret@10"] >= -1e-6).all()


def test_ground_truth_maps_internal_ids_back_to_the_world(tmp_path):
    # 500 items, few interactions: many items are never consumed, so internal ids != world ids + 1.
    sim = _small(n_users=30, n_items=500, min_seq_len=5, max_seq_len=8)
    batch, truth, dm = _val_batch_and_truth(sim, tmp_path)
    assert dm.n_items < 500
    data = sim.generate()
    world_user = truth.world_user[batch["user_index"]]
    world_item = truth.world_item[batch["target_item"]]
    for u, i, rating in zip(world_user.tolist(), world_item.tolist(), batch["target_rating"].tolist()):
        row = ((data["user"] == u) & (data["item"] == i)).nonzero().squeeze()
        assert data["rating"][row].item() == rating  # the logged rating of that (user, item)


def test_a_policy_scoring_by_the_true_reward_is_the_oracle(tmp_path):
    sim = _small(n_users=60, n_items=300)
    batch, truth, dm = _val_batch_and_truth(sim, tmp_path)
    users = truth.world_user[batch["user_index"]]
    scores = torch.full((len(users), dm.n_items + 1), float("-inf"))
    scores[:, 1:] = sim.true_reward(users, truth.world_item[1:])  # the catalog only
    out = truth.evaluate(batch, mask_items(scores, batch["history_items"]))
    assert torch.allclose(out["true_reward@10"], out["true_reward@10_oracle"])
    assert torch.allclose(out["regret@10"], torch.zeros_like(out["regret@10"]), atol=1e-5)
    assert torch.allclose(out["true_ndcg@10"], torch.ones_like(out["true_ndcg@10"]))


def test_scoring_by_behaviour_logits_reproduces_the_behaviour_reference(tmp_path):
    sim = _small()
    batch, truth, dm = _val_batch_and_truth(sim, tmp_path)
    users = truth.world_user[batch["user_index"]]
    world_history = truth.world_item[batch["history_items"]]
    scores = torch.full((len(users), dm.n_items + 1), float("-inf"))
    scores[:, 1:] = sim.behavior_logits(users, world_history)[:, truth.world_item[1:]]
    out = truth.evaluate(batch, scores)
    assert torch.allclose(out["true_reward@10"], out["true_reward@10_behavior"])


def test_oracle_top10_is_at_least_any_policys(tmp_path):
    batch, truth, dm = _val_batch_and_truth(_small(), tmp_path)
    for seed in range(3):
        out = truth.evaluate(batch, _random_scores(batch, dm.n_items, seed))
        assert (out["true_reward@10_oracle"] >= out["true_reward@10"] - 1e-6).all()
        assert (out["true_reward@10_oracle"] >= out["true_reward@10_behavior"] - 1e-6).all()
        assert (out["true_reward@10_oracle"] >= out["true_reward_sampled"] - 1e-6).all()


def test_behaviour_top10_is_strictly_below_the_oracle_in_the_default_world(tmp_path):
    sim = Simulator(WorldConfig(n_users=300))  # the default world with fewer users
    batch, truth, dm = _val_batch_and_truth(sim, tmp_path)
    out = truth.evaluate(batch, _random_scores(batch, dm.n_items))
    assert out["true_reward@10_behavior"].mean() < out["true_reward@10_oracle"].mean() - 0.2


# ----------------------------------------------------------------------------------- bandit
@pytest.fixture(scope="module")
def bandit() -> BanditWorld:
    return BanditWorld(n_contexts=16, n_actions=12, history_len=2, seed=0)


def test_bandit_target_value_increases_as_lambda_decreases(bandit):
    lams = [100.0, 10.0, 3.0, 1.0, 0.3, 0.1, 0.03]
    values = [bandit.value(bandit.target(lam)) for lam in lams]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert bandit.value(bandit.target(1e6)) == pytest.approx(bandit.value(bandit.pi_beta), abs=1e-4)
    best = bandit.true_reward.masked_fill(bandit.pi_beta == 0, -1).max(1).values.mean().item()
    assert bandit.value(bandit.target(1e-4)) == pytest.approx(best, abs=1e-4)


def test_bandit_target_is_stable_for_tiny_lambda(bandit):
    target = bandit.target(1e-6)
    assert torch.isfinite(target).all()
    assert torch.allclose(target.sum(1), torch.ones(bandit.n_contexts))
    assert (target[bandit.pi_beta == 0] == 0).all()  # support of pi_beta: history items stay excluded


def test_kl_to_target_is_zero_for_the_target_and_positive_for_pi_beta(bandit):
    assert bandit.kl_to_target(bandit.target_log_probs(0.5), 0.5) == pytest.approx(0.0, abs=1e-9)
    assert bandit.kl_to_target(bandit.log_pi_beta, 0.5) > 0.01


def test_bandit_logs_follow_pi_beta_and_carry_noisy_true_rewards():
    bandit = BanditWorld(n_contexts=4, n_actions=10, history_len=1, noise_std=0.3, round_to_stars=False)
    context, action, reward = bandit.sample_logs(20_000, torch.Generator().manual_seed(0))
    assert context.shape == action.shape == reward.shape == (80_000,)
    freq = torch.zeros(4, 10).index_put_((context, action), torch.ones(80_000), accumulate=True) / 20_000
    assert (freq - bandit.pi_beta).abs().max() < 0.015
    noise = reward - bandit.true_reward[context, action]
    assert noise.std().item() == pytest.approx(0.3, rel=0.05)


def test_bandit_rejects_a_non_positive_lambda(bandit):
    with pytest.raises(RecpostError, match="lambda must be > 0"):
        bandit.target(0.0)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("knobs, message", [
    ({"n_users": 0}, "n_users must be a positive integer"),
    ({"n_items": -5}, "n_items must be a positive integer"),
    ({"latent_dim": 0}, "latent_dim must be a positive integer"),
    ({"noise_std": -0.1}, "noise_std must be >= 0"),
    ({"heteroscedasticity": -1.0}, "heteroscedasticity must be >= 0"),
    ({"popularity_weight": 0.5}, "must sum to 1"),
    ({"popularity_weight": 0.85, "taste_weight": -0.15}, "must be >= 0"),
    ({"behavior_temperature": 0.0}, "behavior_temperature must be > 0"),
    ({"slate_size": -1}, "slate_size must be >= 0"),
    ({"min_seq_len": 2}, "min_seq_len must be an integer >= 3"),
    ({"min_seq_len": 10, "max_seq_len": 5}, "must be >= min_seq_len"),
    ({"n_items": 30, "max_seq_len": 40}, "longer than the catalog"),
    ({"candidates": 20, "max_seq_len": 30}, "longer than the candidates per user"),
    ({"candidates": 0}, "candidates must be between 1 and n_items"),
    ({"exposure_concentration": -0.5}, "exposure_concentration must be >= 0"),
    ({"feedback_rate": 0.0}, "feedback_rate must be in"),
    ({"feedback_rate": 1.5}, "feedback_rate must be in"),
    ({"satiation": -1.0}, "satiation must be >= 0"),
    ({"satiation_window": 0}, "satiation_window must be a positive integer"),
    ({"rarity_from": "views"}, "rarity_from must be 'popularity' or 'exposure'"),
    ({"taste_interaction": 1.0, "latent_dim": 1}, "taste_interaction needs latent_dim >= 2"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_simulator_settings_fail_with_one_clear_line(knobs, message):
    with pytest.raises(RecpostError, match=message) as exc:
        _sim(**{"n_items": 100, **knobs})
    assert "\n" not in str(exc.value)


def test_bandit_history_must_leave_an_action():
    with pytest.raises(RecpostError, match="leaves no action"):
        BanditWorld(n_contexts=2, n_actions=5, history_len=5)


# ----------------------------------------------------------------------------------- settings
WORLD_FIELDS = tuple(f.name for f in dataclasses.fields(WorldConfig))
SIM_CONFIGS = ("configs/data/sim.yaml", "configs/data/sim_large.yaml", "configs/pretrain/sim.yaml")


def _source_parser() -> ArgumentParser:
    """A parser with ``source`` typed like ``RecDataModule``'s, so it reads configs as the CLI does."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--source", type=Source)
    return parser


def _instantiate(parser: ArgumentParser, cfg: Namespace) -> Namespace:
    """``parser.instantiate`` (jsonargparse >= 4.49), or ``instantiate_classes`` of older versions."""
    return (getattr(parser, "instantiate", None) or parser.instantiate_classes)(cfg)


def test_world_settings_are_defined_once_in_world_config():
    # The source owns only the sequence lengths and takes its world whole; the bandit view names only
    # the settings whose defaults it changes. Any other world parameter would be a second definition.
    params = inspect.signature(Simulator).parameters
    assert list(params) == ["world", "min_seq_len", "max_seq_len"]
    assert params["world"].default == WorldConfig()
    assert list(inspect.signature(SimWorld).parameters) == ["config"]
    assert set(inspect.signature(BanditWorld).parameters) & set(WORLD_FIELDS) == {
        "seed", "behavior_temperature", "slate_size",
    }


def test_fingerprint_is_the_flat_cache_key_of_before_world_config():
    # Existing caches are keyed by this dict: same keys, same order, same values as the flat signature gave.
    fingerprint = _small(candidates=40, noise_std=0.25).fingerprint()
    assert list(fingerprint) == [
        "source", "version", "n_users", "n_items", "min_seq_len", "max_seq_len", "latent_dim", "reward_scale",
        "quality_mean", "quality_std", "popularity_weight", "taste_weight", "sequential_weight",
        "promotion_weight", "behavior_temperature", "slate_size", "slate_boost", "candidates", "noise_std",
        "heteroscedasticity", "round_to_stars", "seed",
    ]
    # Written out, not derived from WorldConfig: settings added later must not enter an earlier world's key.
    assert fingerprint == {
        "source": "simulator", "version": 1, "n_users": 120, "n_items": 80, "min_seq_len": 5, "max_seq_len": 12,
        "latent_dim": 8, "reward_scale": 1.5, "quality_mean": 0.0, "quality_std": 1.25, "popularity_weight": 0.2,
        "taste_weight": 0.4, "sequential_weight": 0.2, "promotion_weight": 0.2, "behavior_temperature": 0.3,
        "slate_size": 10, "slate_boost": 5.0, "candidates": 40, "noise_std": 0.25, "heteroscedasticity": 0.0,
        "round_to_stars": True, "seed": 1,
    }


@pytest.mark.parametrize("config", SIM_CONFIGS)
def test_configs_give_every_world_setting_in_one_nested_group(config):
    source = yaml.safe_load((ROOT / config).read_text())["data"]["source"]
    assert set(source["init_args"]) == {"world", "min_seq_len", "max_seq_len"}
    assert list(source["init_args"]["world"]) == list(WORLD_FIELDS)  # all spelled out, in the documented order
    parser = _source_parser()
    sim = _instantiate(parser, parser.parse_object({"source": source})).source
    assert isinstance(sim, Simulator)
    assert sim.world.config == WorldConfig(**source["init_args"]["world"])
    if config != "configs/data/sim_large.yaml":
        assert sim.world.config == WorldConfig()  # the default world is the one the configs spell out


def test_a_world_setting_is_overridden_through_its_nested_key():
    parser = _source_parser()
    args = ["--source=recpost.data.Simulator", "--source.init_args.world.noise_std=1.0", "--source.init_args.min_seq_len=5"]
    sim = _instantiate(parser, parser.parse_args(args)).source
    assert sim.world.config == WorldConfig(noise_std=1.0)
    assert (sim.min_seq_len, sim.max_seq_len) == (5, 60)


def _recpost_error(exc: BaseException | None) -> RecpostError | None:
    """The ``RecpostError`` behind ``exc`` (jsonargparse may wrap it), as ``recpost.cli`` reports it."""
    while exc is not None and not isinstance(exc, RecpostError):
        exc = exc.__cause__ or exc.__context__
    return exc


def test_a_bad_world_setting_fails_with_one_line_wherever_the_world_is_built():
    bad = WorldConfig(noise_std=-0.1)  # a config is plain data; the world built from it checks it
    for build in (lambda: SimWorld(bad), lambda: Simulator(bad), lambda: BanditWorld(noise_std=-0.1)):
        with pytest.raises(RecpostError, match="noise_std must be >= 0") as exc:
            build()
        assert "\n" not in str(exc.value)
    parser = _source_parser()
    cfg = parser.parse_args(["--source=recpost.data.Simulator", "--source.init_args.world.noise_std=-0.1"])
    with pytest.raises(Exception) as exc:
        _instantiate(parser, cfg)
    error = _recpost_error(exc.value)
    assert error is not None and "noise_std must be >= 0" in str(error) and "\n" not in str(error)


def test_a_world_given_as_a_dict_is_rejected_with_one_line():
    with pytest.raises(RecpostError, match="world must be a WorldConfig") as exc:
        Simulator({"n_users": 10})
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_pretrain_config_logs_true_reward_in_metrics_csv(tmp_path):
    from tests.helpers import latest_run, recpost

    out = recpost(
        "fit", "--config", "configs/pretrain/sim.yaml", "--trainer.max_epochs", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--data.source.init_args.world.n_users", "150", "--data.source.init_args.world.n_items", "100",
        "--data.source.init_args.max_seq_len", "20", "--data.max_len", "20",
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    header = (latest_run(tmp_path).metrics_csv).read_text().splitlines()[0].split(",")
    assert {f"val/{name}" for name in TRUTH_METRICS} <= set(header)
