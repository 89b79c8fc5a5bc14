"""Online DPO (pairs sampled from the policy being trained) and RS-DPO (pairs kept only where an ensemble of
reward models separates them): where the pairs come from, the filter by hand, bad settings, the real CLI.
The loss on these pairs against a naive computation (whole catalog and chunked) is in test_dpo.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from recpost.core.errors import RecpostError
from recpost.methods import DPO
from recpost.methods.dpo import ensemble_pairs
from tests.helpers import build, last_metrics, pretrained_checkpoint, recpost, reward_model_checkpoint, tiny_datamodule

METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"
FAVOURITE = 7  # the item a policy is made to choose at every state


def _dpo(rlhf_setup, **kw) -> DPO:
    dm, pre, rm = rlhf_setup
    return build(DPO, dm, **{"init_from": str(pre), "reward_model": str(rm), **kw})


def _ensemble(rlhf_setup, tmp_path, k: int = 3) -> list[str]:
    """``k`` reward models of the tiny data (the fixture's and ``k - 1`` more, other seeds)."""
    dm, _, rm = rlhf_setup
    return [str(rm)] + [str(reward_model_checkpoint(dm, tmp_path / f"rm{s}.ckpt", seed=s)) for s in range(1, k)]


def _make_deterministic(backbone, item: int) -> None:
    """Every state's hidden vector becomes the unit vector ``v`` (the final layer norm's weight 0, its bias ``v``)
    and ``item``'s embedding ``50 v``: ``item`` scores 50, every other about 0 (embeddings ~ N(0, 0.02)),
    so the policy puts all but ~e^-46 of its mass on ``item`` wherever the user has not had it."""
    with torch.no_grad():
        v = torch.zeros(backbone.final_ln.bias.shape)
        v[0] = 1.0
        backbone.final_ln.weight.zero_()
        backbone.final_ln.bias.copy_(v)
        backbone.item_emb.weight[item] = 50 * v


def _pairs_with_favourite(dpo, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: whether it holds ``FAVOURITE``, and whether its state had ``FAVOURITE`` already ``[P]``."""
    states, pairs, _ = dpo._pairs(batch)
    _, history = dpo.state_hidden(batch, states)  # [P, H + L]
    return (pairs == FAVOURITE).any(dim=1), (history == FAVOURITE).any(dim=1)


# ----------------------------------------------------------------------------------- online pairs
def test_online_pairs_follow_the_current_policy_not_the_reference(rlhf_setup):
    batch = rlhf_setup[0].train_batch(list(range(64)))
    online = _dpo(rlhf_setup, pair_policy="current")
    _make_deterministic(online.backbone, FAVOURITE)
    torch.manual_seed(0)
    holds, had = _pairs_with_favourite(online, batch)
    assert (~had).sum() > 50 and holds[~had].all()  # every state that can have it samples it
    assert not holds[had].any()  # never an item the user had
    offline = _dpo(rlhf_setup)  # the same moved policy, pairs from the frozen reference
    _make_deterministic(offline.backbone, FAVOURITE)
    torch.manual_seed(0)
    holds, had = _pairs_with_favourite(offline, batch)
    assert holds[~had].float().mean() < 0.3  # ~2 draws out of ~35 unseen items


def test_online_pairs_are_ranked_by_the_reward_model_and_scored_by_the_reference(rlhf_setup):
    dpo = _dpo(rlhf_setup, pair_policy="current")
    _make_deterministic(dpo.backbone, FAVOURITE)
    batch = rlhf_setup[0].train_batch(list(range(32)))
    states, pairs, reference = dpo._pairs(batch)
    rewards = dpo.reward_model.rewards_at(batch["input_items"], batch["input_ratings"], states)  # [P, V + 1]
    rows = torch.arange(len(pairs))
    assert len(pairs) > 0 and (rewards[rows, pairs[:, 0]] > rewards[rows, pairs[:, 1]]).all()
    ref, _ = dpo.log_probs(batch, states, reference=True)
    assert torch.allclose(reference, ref.gather(1, pairs), atol=1e-6)


def test_at_the_start_online_dpo_is_log_2_with_zero_margins(rlhf_setup):
    loss, logs = _dpo(rlhf_setup, pair_policy="current").training_loss(rlhf_setup[0].train_batch(list(range(32))))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and logs["rewards/margins"].item() == 0.0


def test_online_pairs_are_sampled_without_dropout_and_training_mode_comes_back(rlhf_setup, monkeypatch):
    dpo = _dpo(rlhf_setup, pair_policy="current", disable_dropout=False)
    dpo.train()
    modes = []
    encode = dpo.backbone.encode
    monkeypatch.setattr(dpo.backbone, "encode", lambda *a: modes.append(dpo.backbone.training) or encode(*a))
    dpo.training_loss(rlhf_setup[0].train_batch(list(range(16))))
    assert modes == [False, True]  # the sampling pass, then the update's pass (with dropout)
    assert dpo.backbone.training


def test_a_few_online_updates_move_the_implicit_rewards_apart(rlhf_setup):
    dpo = _dpo(rlhf_setup, pair_policy="current", beta=0.5)
    opt = torch.optim.AdamW(dpo.parameters(), lr=0.02)
    batch = rlhf_setup[0].train_batch(list(range(64)))
    torch.manual_seed(0)
    for _ in range(5):
        loss, _ = dpo.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, logs = dpo.training_loss(batch)
    assert logs["rewards/margins"].item() > 0 and logs["rewards/accuracies"].item() > 0.5


# ----------------------------------------------------------------------------------- the ensemble filter
def test_the_ensemble_filter_keeps_exactly_the_pairs_whose_bounds_separate():
    two = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]])
    rewards = torch.tensor([  # [K = 3, N = 5, 2]; per state: (mean, std) of each item over the 3 models
        [[4.2, 2.2], [3.5, 2.8], [1.0, 3.0], [3.0, 3.0], [3.0, 1.0]],
        [[4.0, 2.0], [3.0, 2.6], [1.0, 3.0], [3.0, 2.0], [3.0, 2.0]],
        [[3.8, 1.8], [2.5, 2.4], [1.0, 3.0], [3.0, 4.0], [3.0, 3.0]],
    ])
    # 0: (4, .2) vs (2, .2): 3.8 > 2.2, kept      1: (3, .5) vs (2.6, .2): 2.5 < 2.8, dropped
    # 2: (1, 0) vs (3, 0): the second chosen      3: equal means (3, 0) vs (3, 1): never a preference
    # 4: (3, 0) vs (2, 1): 3 - 0 = 2 + 1 at z = 1, dropped (the bound is strict)
    pairs, keep = ensemble_pairs(two, rewards, z=1.0)
    assert keep.tolist() == [True, False, True, False, False]
    assert pairs[keep].tolist() == [[1, 2], [6, 5]] and pairs[1].tolist() == [3, 4]  # ranked by the mean
    assert ensemble_pairs(two, rewards, z=0.5)[1].tolist() == [True, True, True, False, True]
    assert ensemble_pairs(two, rewards, z=0.0)[1].tolist() == [True, True, True, False, True]  # means differ


def test_ensemble_pairs_are_those_the_ensemble_separates(rlhf_setup, tmp_path):
    ensemble = _ensemble(rlhf_setup, tmp_path)
    dpo = _dpo(rlhf_setup, reward_model=None, reward_ensemble=ensemble, ensemble_filter_z=0.5)
    assert len(dpo.reward_ensemble) == 3 and "reward_model" not in dpo._frozen
    batch = rlhf_setup[0].train_batch(list(range(64)))
    states, pairs, _ = dpo._pairs(batch)
    rewards = torch.stack([rm.rewards_at(batch["input_items"], batch["input_ratings"], states, pairs)
                           for rm in dpo.reward_ensemble])  # [3, P, 2]
    mean, std = rewards.mean(0), rewards.std(0)
    assert len(pairs) > 0 and (mean[:, 0] - 0.5 * std[:, 0] > mean[:, 1] + 0.5 * std[:, 1]).all()
    _, logs = dpo.training_loss(batch)
    assert 0 < logs["pairs/kept"].item() < 1  # some states' pairs are not separated


def test_a_wider_bound_keeps_fewer_pairs(rlhf_setup, tmp_path):
    ensemble, batch = _ensemble(rlhf_setup, tmp_path), rlhf_setup[0].train_batch(list(range(64)))
    kept = []
    for z in (0.0, 1.0, 3.0):
        torch.manual_seed(0)  # the same sampled items
        kept.append(_dpo(rlhf_setup, reward_ensemble=ensemble, ensemble_filter_z=z).training_loss(batch)[1]["pairs/kept"])
    assert kept[0] > kept[1] > kept[2]


def test_online_pairs_can_be_ensemble_filtered(rlhf_setup, tmp_path):
    dpo = _dpo(rlhf_setup, pair_policy="current", reward_ensemble=_ensemble(rlhf_setup, tmp_path, k=2))
    _make_deterministic(dpo.backbone, FAVOURITE)
    holds, had = _pairs_with_favourite(dpo, rlhf_setup[0].train_batch(list(range(64))))
    assert len(holds) > 0 and holds[~had].all()


@pytest.mark.parametrize(("kw", "message"), [
    ({"pair_policy": "newest"}, "pair_policy must be one of reference, current"),
    ({"pair_source": "logged", "pair_policy": "current"}, "pair_policy: current needs pair_source: reward_model"),
    ({"reward_ensemble": ["one.ckpt"]}, "reward_ensemble needs at least 2 RewardModel checkpoints"),
    ({"reward_ensemble": "a.ckpt"}, "reward_ensemble must be a list"),
    ({"reward_ensemble": ["a.ckpt", "./a.ckpt"]}, "lists .*a.ckpt twice"),
    ({"ensemble_filter_z": -1.0}, r"ensemble_filter_z must be in \[0, inf\)"),
    ({"ensemble_filter_z": math.inf}, "ensemble_filter_z"),
])
def test_bad_online_or_ensemble_settings_are_one_clear_error(rlhf_setup, kw, message):
    with pytest.raises(RecpostError, match=message):
        _dpo(rlhf_setup, **kw)


def test_an_ensemble_of_logged_pairs_is_refused(rlhf_setup, tmp_path):
    with pytest.raises(RecpostError, match="reward_ensemble needs pair_source: reward_model"):
        _dpo(rlhf_setup, pair_source="logged", reward_ensemble=_ensemble(rlhf_setup, tmp_path, k=2))


def test_an_ensemble_member_that_is_not_a_reward_model_is_named(rlhf_setup):
    _, pre, rm = rlhf_setup  # pre: a policy checkpoint, no rating head
    with pytest.raises(RecpostError, match=r"model.reward_ensemble\[1\]: .* is not a reward-model checkpoint"):
        _dpo(rlhf_setup, reward_ensemble=[str(rm), str(pre)])


def test_an_ensemble_needs_no_single_reward_model(rlhf_setup, tmp_path):
    assert not DPO.needs_reward_model({"reward_ensemble": ["a", "b"]}) and DPO.needs_reward_model({})
    with pytest.raises(RecpostError, match="needs model.reward_model .* or model.reward_ensemble"):
        _dpo(rlhf_setup, reward_model=None, pair_policy="current")


# ----------------------------------------------------------------------------------- the real CLI
@pytest.mark.slow
def test_recpost_fit_runs_rs_dpo_on_online_pairs_from_its_config(tiny_config):
    dm = tiny_datamodule(tiny_config.parent)  # the same CSV as the config: the same catalog
    pre = pretrained_checkpoint(dm, tiny_config.parent / "pre.ckpt")
    rms = [reward_model_checkpoint(dm, tiny_config.parent / f"rm{s}.ckpt", seed=s) for s in range(2)]
    root = tiny_config.parent / "rs_dpo"
    out = recpost("fit", "--config", str(tiny_config), "--config", str(METHOD_CONFIGS / "rs_dpo.yaml"),
                  "--model.init_args.init_from", str(pre), "--model.init_args.reward_model", str(rms[0]),
                  "--model.init_args.reward_ensemble", f"[{rms[0]}, {rms[1]}]", "--model.init_args.pair_policy", "current",
                  "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root))
    assert out.returncode == 0, out.stderr[-3000:]
    _, rows = last_metrics(root)
    kept = [float(r["pairs/kept"]) for r in rows if r.get("pairs/kept")]
    assert kept and all(0 <= k <= 1 for k in kept)
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r.get("train/loss"))
    assert math.isfinite(float(next(r for r in rows if r.get("val/rm_reward@10"))["val/rm_reward@10"]))
