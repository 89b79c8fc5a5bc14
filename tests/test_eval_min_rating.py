"""The paper's test protocol as a data option: ``data.eval_min_rating`` evaluates only the users whose
held-out target is rated at least that (validation: the validation target; test: the test target)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from recpost.data import RecDataModule, Table
from recpost.core.errors import RecpostError
from recpost.methods import SFT
from tests.helpers import build

# (validation target's rating, test target's rating) of each user; each user has 4 earlier items
HELD_OUT = [(5, 5), (4.5, 3), (2, 4.5), (1, 1), (5, 4), (3, 5)]


def write_table(path: Path) -> Path:
    lines = ["user_id,item_id,rating,timestamp"]
    for u, (val, test) in enumerate(HELD_OUT):
        ratings = [3, 4, 2, 5, val, test]
        for t, r in enumerate(ratings):
            lines.append(f"u{u},i{(u * 3 + t) % 20},{r},{1000 + t}")
    path.write_text("\n".join(lines) + "\n")
    return path


def datamodule(tmp_path: Path, **kw) -> RecDataModule:
    """A DataModule on the table above (written once per folder)."""
    table = tmp_path / "t.csv"
    if not table.exists():
        write_table(table)
    return RecDataModule(Table(str(table), name="t"), max_len=4, batch_size=8, eval_batch_size=2,
                         cache_dir=str(tmp_path / "cache"), **kw)


def test_each_split_keeps_the_users_whose_own_held_out_target_qualifies(tmp_path):
    dm = datamodule(tmp_path, eval_min_rating=4.5)
    assert dm.eval_users("val").tolist() == [0, 1, 4]
    assert dm.eval_users("test").tolist() == [0, 2, 5]
    assert dm.eval_users("predict").tolist() == list(range(6))
    assert datamodule(tmp_path).eval_users("test").tolist() == list(range(6))


def test_setup_logs_how_many_users_each_split_keeps(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="recpost.data.datamodule"):
        datamodule(tmp_path, eval_min_rating=4.5).setup("fit")
    assert "eval_min_rating 4.5: 3 of 6 test users, 3 of 6 validation users" in caplog.text


def _test(dm: RecDataModule, module: SFT) -> tuple[dict, dict]:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    return metrics, module.test_per_user


def test_metrics_are_those_of_the_kept_users_and_everything_else_is_unchanged(tmp_path):
    kept, every = datamodule(tmp_path, eval_min_rating=4.5), datamodule(tmp_path)
    module = build(SFT, every).eval()
    filtered, rows = _test(kept, module)
    _, all_rows = _test(every, module)
    assert filtered["test/n_users"] == 3 and rows["user_index"].tolist() == [0, 2, 5]
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    assert trainer.validate(module, datamodule=kept, verbose=False)[0]["val/n_users"] == 3  # users 0, 1, 4
    # the kept users' per-user values are exactly those of the all-users test (same histories and masking)
    assert torch.equal(rows["ndcg@10"], all_rows["ndcg@10"][[0, 2, 5]])
    assert filtered["test/ndcg@10"] == pytest.approx(all_rows["ndcg@10"][[0, 2, 5]].mean().item())


@pytest.mark.parametrize("value", [5.5, float("nan"), "4.5"])
def test_a_threshold_no_target_can_reach_is_one_clear_error(tmp_path, value):
    with pytest.raises(RecpostError, match=r"data.eval_min_rating must be a rating on the source's scale, at most 5"):
        datamodule(tmp_path, eval_min_rating=value)


def test_a_threshold_that_leaves_nobody_is_one_clear_error(tmp_path):
    source = Table(str(write_table(tmp_path / "t.csv")), name="t", rating_range=(1.0, 6.0))  # 6 stars, none given
    dm = RecDataModule(source, max_len=4, cache_dir=str(tmp_path / "cache"), eval_min_rating=5.5)
    with pytest.raises(RecpostError, match="eval_min_rating 5.5 leaves no user to evaluate: no test target is rated >= 5.5"):
        dm.eval_users("test")
