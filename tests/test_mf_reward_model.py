"""The matrix-factorisation rating model (``MFRewardModel``): its loss by hand, the user fold-in, no leakage of
held-out ratings, and its checkpoint as a judge (never as a policy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recpost.core.errors import RecpostError
from recpost.data import RecDataModule, Table
from recpost.methods import MFRewardModel
from recpost.models import MFRatingModel
from recpost.models.checkpoint import load_judge, load_policy
from tests.helpers import build, save_checkpoint, write_tiny_interactions


def _hand_model() -> MFRatingModel:
    """b = 3, b_1 = 0.5, b_2 = -0.5, q_1 = 1, q_2 = 2 (rank 1), reg = 0.5."""
    mf = MFRatingModel(n_items=2, rank=1, reg=0.5)
    with torch.no_grad():
        mf.bias.fill_(3.0)
        mf.item_bias.copy_(torch.tensor([0.0, 0.5, -0.5]))
        mf.item_factors.copy_(torch.tensor([[0.0], [1.0], [2.0]]))
    return mf


def test_the_loss_matches_a_hand_computed_example():
    # One user rated item 1 with 4 and item 2 with 3 (a padded slot in front).
    items, ratings = torch.tensor([[0, 1, 2]]), torch.tensor([[0.0, 4.0, 3.0]])
    mf = _hand_model()
    # Residuals y = r - b - b_i = (0.5, 0.5); z_j = (1, q_j); ridge reg * n_u = 0.5 * 2 = 1:
    # [[3, 3], [3, 6]] x = [1, 1.5]  ->  (b_u, p_u) = (1/6, 1/6).
    assert mf.user_factors(items, ratings)[0].tolist() == pytest.approx([1 / 6, 1 / 6], rel=1e-5)
    # Predictions 3 + 0.5 + 1/6 + 1/6 = 23/6 and 3 - 0.5 + 1/6 + 2/6 = 3: errors -1/6 and 0, MSE 1/72.
    pred = mf.predict_rewards(items, ratings, torch.tensor([[1, 2]]))[0].tolist()
    assert pred == pytest.approx([23 / 6, 3.0], rel=1e-5)
    objective, mse = (v.item() for v in mf.loss(items, ratings))
    assert mse == pytest.approx(1 / 72, rel=1e-5)
    # reg x mean over the 2 ratings of |q_i|^2 + b_i^2 + |x_u|^2: 0.5 * ((1.25 + 1/18) + (4.25 + 1/18)) / 2.
    assert objective == pytest.approx(1 / 72 + 0.5 * (5.5 + 1 / 9) / 2, rel=1e-5)


def test_the_users_factors_are_the_ridge_solution_and_minimise_the_objective():
    torch.manual_seed(0)
    mf = MFRatingModel(n_items=30, rank=4, reg=0.1)
    items = torch.randint(1, 31, (5, 12))
    items[:, :3] = 0  # left padding
    ratings = torch.randint(1, 6, (5, 12)).float() * (items > 0)
    x = mf.user_factors(items, ratings).detach()  # [5, 5]
    for row in range(5):  # numpy's least squares on the augmented ridge system agrees
        keep = items[row] > 0
        z = np.c_[np.ones(int(keep.sum())), mf.item_factors[items[row][keep]].detach().numpy()]
        y = (ratings[row][keep] - mf.bias - mf.item_bias[items[row][keep]]).detach().numpy()
        lam = np.sqrt(0.1 * keep.sum().item()) * np.eye(5)
        want = np.linalg.lstsq(np.r_[z, lam], np.r_[y, np.zeros(5)], rcond=None)[0]
        assert x[row].numpy() == pytest.approx(want, abs=1e-4)
    # The user part of the objective is at its minimum: moving (b_u, p_u) either way only raises it.
    @torch.no_grad()
    def user_objective(user: torch.Tensor) -> float:
        err = mf._predict(user, items) - ratings
        n = (items > 0).sum(1)
        return (((err * (items > 0)) ** 2).sum() + (0.1 * n * user.pow(2).sum(-1)).sum()).item()
    base = user_objective(x)
    for step in (1e-2, -1e-2):
        assert user_objective(x + step) > base


def _data(tmp_path, name: str, held_out_rating: int | None = None) -> RecDataModule:
    """The tiny data; with ``held_out_rating``, every user's last two ratings (validation and test targets) set to it."""
    path = write_tiny_interactions(tmp_path / f"{name}.csv")
    if held_out_rating is not None:
        header, *rows = [line.split(",") for line in path.read_text().splitlines()]  # user's rows in time order
        per_user: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            per_user.setdefault(row[0], []).append(i)
        for i in (i for positions in per_user.values() for i in positions[-2:]):
            rows[i][2] = str(held_out_rating)
        path.write_text("\n".join(",".join(row) for row in [header, *rows]) + "\n")
    dm = RecDataModule(Table(str(path), name="tiny"), max_len=8, batch_size=16, cache_dir=str(tmp_path / f"cache_{name}"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _trained(dm: RecDataModule) -> MFRewardModel:
    model = build(MFRewardModel, dm, rank=4, reg=0.05)
    train = dm.training_interactions()
    model.mf.init_bias(float(train.rating.mean()))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for start in range(0, 64, 16):
        loss, _ = model.training_loss(dm.train_batch(list(range(start, start + 16))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_no_held_out_rating_reaches_the_model(tmp_path):
    """Training sees only training interactions, and a user is scored from the ratings before the target."""
    dm_a, dm_b = _data(tmp_path, "a", held_out_rating=1), _data(tmp_path, "b", held_out_rating=5)
    assert dm_a.item_map_hash == dm_b.item_map_hash  # the same items: only held-out ratings differ
    val_a, val_b = dm_a.eval_batch(range(20), "val"), dm_b.eval_batch(range(20), "val")
    assert (val_a["target_rating"] == 1).all() and (val_b["target_rating"] == 5).all()
    model_a, model_b = _trained(dm_a), _trained(dm_b)
    # Trained on both, the same weights: no validation or test rating is a training rating.
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    # Validation users are scored from their training ratings alone: the same predictions whatever their
    # validation and test ratings.
    pred_a = model_a.predict_rewards(val_a["input_items"], val_a["input_ratings"])
    pred_b = model_b.predict_rewards(val_b["input_items"], val_b["input_ratings"])
    assert torch.allclose(pred_a, pred_b)
    # A test user's history is its training ratings and the validation rating, never the test one.
    test = dm_a.eval_batch(range(20), "test")
    assert torch.equal(test["input_ratings"][:, -1], val_a["target_rating"])


def test_a_fit_starts_at_the_mean_training_rating_and_lowers_the_objective(tmp_path):
    import lightning as L

    dm = _data(tmp_path, "fit")
    model = build(MFRewardModel, dm, rank=4, reg=0.05, lr=0.05)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    train = dm.training_interactions()
    batch = dm.train_batch(list(range(32)))
    model.mf.init_bias(float(train.rating.mean()))
    before = model.training_loss(batch)[0].item()
    model.mf.initialized.fill_(False)  # as a fresh model: the fit sets b itself
    model.mf.bias.data.zero_()
    trainer.fit(model, datamodule=dm)
    assert bool(model.mf.initialized) and abs(model.mf.bias.item() - float(train.rating.mean())) < 0.5
    assert model.training_loss(batch)[0].item() < before
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert {"val/rmse", "val/rmse_item_mean", "val/bias"} <= set(metrics)


def test_an_mf_checkpoint_loads_as_a_judge_and_never_as_a_policy(tmp_path):
    dm = _data(tmp_path, "ckpt")
    model = _trained(dm)
    path = save_checkpoint(model, tmp_path / "mf.ckpt")
    judge = load_judge(str(path), dm.item_map_hash)
    batch = dm.eval_batch(range(10), "test")
    top = torch.tensor([[1, 2, 3]]).expand(10, 3)
    assert isinstance(judge, MFRatingModel) and not any(p.requires_grad for p in judge.parameters())
    assert torch.allclose(judge.predict_rewards(batch["input_items"], batch["input_ratings"], top),
                          model.predict_rewards(batch["input_items"], batch["input_ratings"], top))
    # column_scorer: the same ratings a chunk of the catalog at a time, padding at -inf
    every = judge.predict_rewards(batch["input_items"], batch["input_ratings"])
    chunk = judge.column_scorer(batch["input_items"], batch["input_ratings"])(slice(0, 5))
    assert torch.isinf(chunk[:, 0]).all() and torch.allclose(chunk[:, 1:], every[:, 1:5])
    with pytest.raises(RecpostError, match="is a reward model"):
        load_policy(str(path), dm.item_map_hash)


def test_mf_settings_are_checked():
    with pytest.raises(RecpostError, match=r"model\.rank must be an integer >= 1"):
        MFRewardModel.check_settings(rank=0)
    with pytest.raises(RecpostError, match=r"model\.reg must be >= 0"):
        MFRewardModel.check_settings(reg=-1.0)
    with pytest.raises(RecpostError, match="no sequence encoder to start from"):
        MFRewardModel.check_settings(init_from="base.ckpt")
