"""DPO / IPO on item pairs: the losses by hand, the start at the reference, pair construction, a real fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from recpost.core.errors import RecpostError
from recpost.methods import DPO
from recpost.methods.dpo import dpo_loss, first_seen, logged_pairs
from tests.helpers import (
    build,
    last_metrics,
    pretrained_checkpoint,
    recpost,
    reward_model_checkpoint,
    tiny_datamodule,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "method" / "dpo.yaml"

# log pi(c) = -1, log pi(r) = -2, log pi_ref(c) = log pi_ref(r) = -1.5: margin = 0.5 - (-0.5) = 1.
LOGPS = [torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5)]


def _dpo(rlhf_setup, **kw) -> DPO:
    dm, pre, rm = rlhf_setup
    return build(DPO, dm, **{"init_from": str(pre), "reward_model": str(rm), **kw})


def test_sigmoid_loss_and_implicit_rewards_match_hand_computed_values():
    losses, chosen, rejected = dpo_loss(*LOGPS, beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.5)))  # -log sigmoid(0.5 * 1)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.25, -0.25))


def test_label_smoothing_mixes_in_the_flipped_preference():
    losses, _, _ = dpo_loss(*LOGPS, beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5)))


def test_ipo_loss_matches_hand_computed_values():
    assert dpo_loss(*LOGPS, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(0.0)  # (1 - 1/(2*0.5))^2
    assert dpo_loss(*LOGPS, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(1.0)  # (1 - 2)^2


@pytest.mark.parametrize("pair_source", ["reward_model", "logged"])
def test_policy_equal_to_reference_gives_log_2_and_zero_margins(rlhf_setup, pair_source):
    dpo = _dpo(rlhf_setup, pair_source=pair_source)
    loss, logs = dpo.training_loss(rlhf_setup[0].train_batch(list(range(32))))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert logs["rewards/margins"].item() == 0.0 and logs["rewards/chosen"].item() == 0.0
    assert 0 < logs["pairs/kept"].item() <= 1


def test_logged_pairs_choose_the_higher_rating_and_skip_ties():
    # one window: targets a=1 (4 stars), b=2 (4 stars), c=3 (2 stars), d=4 (5 stars)
    items = torch.tensor([[1, 2, 3, 4]])
    ratings = torch.tensor([[4.0, 4.0, 2.0, 5.0]])
    states = torch.ones(1, 4, dtype=torch.bool)
    chosen, rejected, valid = logged_pairs(items, ratings, states, generator=torch.Generator().manual_seed(0))
    assert valid.tolist() == [[True, True, True, False]]  # the last state has no later item
    # state 2 (c, 2 stars) can only pair with d (5 stars): d chosen
    assert (chosen[0, 2].item(), rejected[0, 2].item()) == (4, 3)
    for t in (0, 1):  # a or b (4 stars) against c (2 stars; chosen a/b) or d (5 stars; chosen d); never a vs b
        pair = {chosen[0, t].item(), rejected[0, t].item()}
        assert pair in ({t + 1, 3}, {t + 1, 4})
        assert ratings[0, chosen[0, t] - 1] > ratings[0, rejected[0, t] - 1]


def test_logged_pairs_never_use_an_item_of_the_states_history():
    items = torch.tensor([[1, 2, 3]])
    ratings = torch.tensor([[1.0, 5.0, 3.0]])
    seen_at = torch.tensor([[3, -1, 3]])  # item 2 was had before the window: every state has had it
    chosen, rejected, valid = logged_pairs(items, ratings, torch.ones(1, 3, dtype=torch.bool), seen_at)
    assert valid[0, 0] and {chosen[0, 0].item(), rejected[0, 0].item()} == {1, 3}
    assert not valid[0, 1]  # the logged item itself was had: no pair


def test_first_seen_finds_when_a_state_first_had_each_next_item():
    inputs = torch.tensor([[0, 7, 4, 9]])  # window inputs
    nexts = torch.tensor([[0, 4, 9, 5]])  # the item after each input position (a keep_repeats window: 5 again)
    earlier = torch.tensor([[5, 0]])  # 5 was had before the window
    # 4 and 9 are first had as inputs at 2 and 3 (right after their positions); 5 before the window (-1);
    # position 0 has no next item (never had: L = 4)
    assert first_seen(nexts, inputs, earlier).tolist() == [[4, 2, 3, -1]]


def test_reward_model_pairs_are_ranked_by_the_reward_model(rlhf_setup):
    dpo = _dpo(rlhf_setup)
    batch = rlhf_setup[0].train_batch(list(range(32)))
    states, pairs, reference = dpo._pairs(batch)
    chosen, rejected = pairs.unbind(1)
    rewards = dpo._frozen["reward_model"].rewards_at(batch["input_items"], batch["input_ratings"], states)
    rows = torch.arange(len(chosen))
    assert len(chosen) > 0 and (rewards[rows, chosen] > rewards[rows, rejected]).all()
    # the pairs' reference log-probs are the reference policy's at those states
    ref, _ = dpo.log_probs(batch, states, reference=True)
    assert torch.allclose(reference, ref.gather(1, pairs), atol=1e-6)


@pytest.mark.parametrize("pair_source", ["reward_model", "logged"])
def test_pairs_never_use_an_item_the_user_had_before_the_window(rlhf_setup, pair_source):
    dm = rlhf_setup[0]
    dpo = _dpo(rlhf_setup, pair_source=pair_source)
    batch = dm.train_batch(list(range(len(dm.train_windows()[0]))))
    states, pairs, _ = dpo._pairs(batch)
    chosen, rejected = pairs.unbind(1)
    earlier = batch["earlier_items"][states.nonzero()[:, 0]]  # [P, H]
    assert len(chosen) and (batch["earlier_items"] > 0).any()
    for items in (chosen, rejected):
        assert not (earlier == items[:, None]).any()


def test_a_few_updates_separate_chosen_from_rejected(rlhf_setup):
    dpo = _dpo(rlhf_setup, beta=0.5, pair_source="logged")
    opt = torch.optim.AdamW(dpo.parameters(), lr=0.02)
    batch = rlhf_setup[0].train_batch(list(range(64)))
    for _ in range(5):
        loss, logs = dpo.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, logs = dpo.training_loss(batch)
    assert logs["rewards/margins"].item() > 0 and logs["rewards/accuracies"].item() > 0.5


@pytest.mark.parametrize(("kw", "message"), [
    ({"beta": 0.0}, "beta must be > 0"),
    ({"beta": -0.1}, "beta must be > 0"),
    ({"reward_model": None}, "needs model.reward_model"),
    ({"pair_source": "logged", "state_positions": "last"}, "needs state_positions: all"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
])
def test_bad_settings_are_one_clear_error(rlhf_setup, kw, message):
    with pytest.raises(RecpostError, match=message):
        _dpo(rlhf_setup, **kw)


def test_logged_pairs_need_no_reward_model(rlhf_setup):
    dpo = _dpo(rlhf_setup, pair_source="logged", reward_model=None)
    assert "reward_model" not in dpo._frozen and dpo.extra_metric_names() == ()


def test_a_reward_model_of_another_catalog_is_rejected(rlhf_setup, tmp_path):
    other = tiny_datamodule(tmp_path / "other", n_items=45, seed=1)
    rm = reward_model_checkpoint(other, tmp_path / "other_rm.ckpt", steps=0)
    with pytest.raises(RecpostError, match="another item catalog"):
        _dpo(rlhf_setup, reward_model=str(rm))


@pytest.mark.slow
def test_recpost_fit_runs_dpo_and_logs_trl_metrics(tiny_config):
    dm = tiny_datamodule(tiny_config.parent)  # the same CSV as the config: the same catalog
    pre = pretrained_checkpoint(dm, tiny_config.parent / "pre.ckpt")
    rm = reward_model_checkpoint(dm, tiny_config.parent / "rm.ckpt")
    root = tiny_config.parent / "dpo"
    out = recpost("fit", "--config", str(tiny_config), "--config", str(CONFIG), "--model.init_args.init_from", str(pre),
                  "--model.init_args.reward_model", str(rm), "--trainer.max_epochs", "1",
                  "--trainer.default_root_dir", str(root))
    assert out.returncode == 0, out.stderr[-3000:]
    run, rows = last_metrics(root)
    train = [r for r in rows if r.get("train/loss")]
    for name in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(math.isfinite(float(r[name])) for r in train), name
    val = next(r for r in rows if r.get("val/ndcg@10"))
    assert math.isfinite(float(val["val/rm_reward@10"]))
    assert (run.best_checkpoint).is_file()


def _naive_log_probs(backbone, batch, states):
    """log pi over the catalog at each state with a dense mask built item by item (the slow, obvious way)."""
    hidden = backbone.encode(batch["input_items"], batch["input_ratings"], batch["input_timestamps"])
    rows = []
    for b, t in states.nonzero().tolist():
        logits = backbone.score(hidden[b, t]).clone()  # [V + 1]
        had = set(batch["earlier_items"][b].tolist()) | set(batch["input_items"][b, : t + 1].tolist()) | {0}
        logits[sorted(had)] = float("-inf")
        rows.append(logits.log_softmax(-1))
    return torch.stack(rows)


NAIVE_CASES = {
    "rm-pairs": {"pair_source": "reward_model"},
    "logged-pairs": {"pair_source": "logged"},
    "online-pairs": {"pair_policy": "current"},  # sampled from the policy being trained
    "ensemble-filtered": {"reward_ensemble": 3, "ensemble_filter_z": 0.5},  # RS-DPO
}


@pytest.mark.parametrize("chunk", [None, 7], ids=["whole-catalog", "chunked"])
@pytest.mark.parametrize("case", NAIVE_CASES)
def test_the_dpo_loss_equals_a_naive_computation_on_a_fixed_batch(rlhf_setup, tmp_path, case, chunk):
    # The fast path (index-list masks, one shared reference pass, the catalog a chunk at a time) computes
    # exactly the obvious loss on the pairs it drew, with a policy that has moved from the reference.
    dm, _, rm = rlhf_setup
    settings = dict(NAIVE_CASES[case])
    if "reward_ensemble" in settings:
        settings["reward_ensemble"] = [str(rm)] + [
            str(reward_model_checkpoint(dm, tmp_path / f"rm{k}.ckpt", seed=k)) for k in range(1, settings["reward_ensemble"])]
    dpo = _dpo(rlhf_setup, score_chunk_size=chunk, **settings)
    with torch.no_grad():
        dpo.backbone.item_emb.weight.mul_(1.5)  # policy != reference
    batch = dm.train_batch(list(range(len(dm.train_windows()[0]))))
    torch.manual_seed(3)
    loss, _ = dpo.training_loss(batch)
    torch.manual_seed(3)
    states, pairs, _ = dpo._pairs(batch)
    assert len(pairs) > 0
    with torch.no_grad():
        policy = _naive_log_probs(dpo.backbone, batch, states).gather(1, pairs)
        reference = _naive_log_probs(dpo.reference, batch, states).gather(1, pairs)
    expected, _, _ = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], dpo.hparams.beta)
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_the_logged_pair_config_needs_no_reward_model():
    import yaml

    model = yaml.safe_load((CONFIG.parent / "dpo_logged.yaml").read_text())["model"]
    args = model["init_args"]
    assert model["class_path"] == "recpost.methods.DPO" and args["pair_source"] == "logged"
    assert args["reward_model"] is None and not DPO.needs_reward_model(args)
    DPO.check_settings(**args)
