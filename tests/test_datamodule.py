"""RecDataModule: leave-one-out splits and the batches every method trains and evaluates on.

The logs made here give every user their own block of item ids (user 0: 1..3, user 1: 4..7, ...),
so an item id tells whose it is and where it sits in that user's sequence. The file holds
``OFFSET + id`` (all of one width, so sorted as text or as numbers alike): internal id = ``id``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recpost.data import RecDataModule, Table
from recpost.data.interactions import item_map_hash
from recpost.core.errors import RecpostError

LENGTHS = (3, 4, 7, 12, 25)  # interactions per user; 25 > max_len + 3 so training is cut into windows
MAX_LEN = 4
OFFSET = 1000  # file item id = OFFSET + internal item id


def make_log(tmp_path: Path, lengths=LENGTHS, seed: int = 0) -> tuple[Path, list[list[tuple[int, float]]]]:
    """A shuffled ratings CSV and, per user, the chronological (item, rating) sequence it encodes."""
    rng = np.random.default_rng(seed)
    rows, seqs, first_item = [], [], 1
    for u, n in enumerate(lengths):
        items = rng.permutation(np.arange(first_item, first_item + n))  # chronological order
        ratings = rng.integers(1, 6, size=n).astype(float)
        seqs.append(list(zip(items.tolist(), ratings.tolist())))
        rows += [(f"u{u}", OFFSET + int(i), r, 1000 + 10 * t) for t, (i, r) in enumerate(zip(items, ratings))]
        first_item += n
    rows = [rows[k] for k in rng.permutation(len(rows))]  # file order is not time order
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    return path, seqs


def make_datamodule(tmp_path: Path, lengths=LENGTHS, **kwargs) -> tuple[RecDataModule, list[list[tuple[int, float]]]]:
    path, seqs = make_log(tmp_path, lengths)
    kwargs = {"max_len": MAX_LEN, "batch_size": 3, "eval_batch_size": 2, **kwargs}
    dm = RecDataModule(Table(str(path)), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup("fit")
    return dm, seqs


def eval_rows(dm: RecDataModule, split: str):
    """(user, batch, row) for every user of an evaluation split."""
    loader = {"val": dm.val_dataloader, "test": dm.test_dataloader, "predict": dm.predict_dataloader}[split]()
    for batch in loader:
        for b, u in enumerate(batch["user_index"].tolist()):
            yield u, batch, b


def nonzero(row: torch.Tensor) -> list:
    return [v for v in row.tolist() if v != 0]


def train_batches(dm: RecDataModule) -> list[dict[str, torch.Tensor]]:
    return list(dm.train_dataloader())


def training_items(seqs) -> list[int]:
    return [i for seq in seqs for i, _ in seq[:-2]]


def position(seqs) -> dict[int, tuple[int, int]]:
    """item -> (user, index in that user's sequence)."""
    return {i: (u, k) for u, seq in enumerate(seqs) for k, (i, _) in enumerate(seq)}


# ----------------------------------------------------------------------------------- split
def test_validation_target_is_the_second_to_last_interaction(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    for u, batch, b in eval_rows(dm, "val"):
        assert (batch["target_item"][b].item(), batch["target_rating"][b].item()) == seqs[u][-2]


def test_test_target_is_the_last_interaction(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    for u, batch, b in eval_rows(dm, "test"):
        assert (batch["target_item"][b].item(), batch["target_rating"][b].item()) == seqs[u][-1]


def test_validation_and_test_targets_differ(tmp_path):
    dm, _ = make_datamodule(tmp_path)
    val = {u: batch["target_item"][b].item() for u, batch, b in eval_rows(dm, "val")}
    test = {u: batch["target_item"][b].item() for u, batch, b in eval_rows(dm, "test")}
    assert val.keys() == test.keys() == set(range(len(LENGTHS)))
    assert all(val[u] != test[u] for u in val)


def test_validation_history_never_contains_a_target(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    for u, batch, b in eval_rows(dm, "val"):
        targets = {seqs[u][-2][0], seqs[u][-1][0]}
        assert not targets & set(nonzero(batch["history_items"][b]))
        assert not targets & set(nonzero(batch["input_items"][b]))
        assert nonzero(batch["history_items"][b]) == [i for i, _ in seqs[u][:-2]]


def test_validation_input_ratings_are_those_of_the_history_only(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    for u, batch, b in eval_rows(dm, "val"):
        shown = seqs[u][:-2][-MAX_LEN:]
        width = batch["input_items"].shape[1]
        assert batch["input_ratings"][b].tolist() == [0.0] * (width - len(shown)) + [r for _, r in shown]


def test_test_history_contains_the_validation_target_but_not_the_test_target(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    for u, batch, b in eval_rows(dm, "test"):
        history = nonzero(batch["history_items"][b])
        assert history == [i for i, _ in seqs[u][:-1]]
        assert seqs[u][-2][0] in history and seqs[u][-1][0] not in history
        assert nonzero(batch["input_items"][b])[-1] == seqs[u][-2][0]


def test_predict_history_is_the_whole_sequence_without_a_target(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    for u, batch, b in eval_rows(dm, "predict"):
        assert "target_item" not in batch
        assert nonzero(batch["history_items"][b]) == [i for i, _ in seqs[u]]


def test_eval_input_items_are_left_padded_with_the_newest_item_last(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    for u, batch, b in eval_rows(dm, "val"):
        shown = [i for i, _ in seqs[u][:-2]][-MAX_LEN:]
        width = batch["input_items"].shape[1]
        assert batch["input_items"][b].tolist() == [0] * (width - len(shown)) + shown


def test_eval_input_keeps_the_newest_max_len_items_and_history_keeps_all(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    longest = max(range(len(LENGTHS)), key=LENGTHS.__getitem__)
    for u, batch, b in eval_rows(dm, "val"):
        if u == longest:
            history = [i for i, _ in seqs[u][:-2]]
            assert batch["input_items"].shape[1] == MAX_LEN
            assert batch["input_items"][b].tolist() == history[-MAX_LEN:]
            assert nonzero(batch["history_items"][b]) == history


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_timestamps_are_the_historys_never_the_targets(tmp_path, split):
    dm, seqs = make_datamodule(tmp_path)
    held_out = {"val": 2, "test": 1}[split]
    for u, batch, b in eval_rows(dm, split):
        n_hist = len(seqs[u]) - held_out
        expected = [1000 + 10 * t for t in range(n_hist)][-MAX_LEN:]  # make_log's timestamps: 1000 + 10 t
        assert nonzero(batch["input_timestamps"][b]) == expected
        assert 1000 + 10 * n_hist not in batch["input_timestamps"][b].tolist()  # the target's own timestamp


def test_training_timestamps_align_with_the_inputs(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    where = position(seqs)
    for batch in train_batches(dm):
        has_item = batch["input_items"] > 0
        ks = [where[i][1] for i in batch["input_items"][has_item].tolist()]
        assert batch["input_timestamps"][has_item].tolist() == [1000 + 10 * k for k in ks]


# ----------------------------------------------------------------------------------- training
def test_training_windows_never_contain_a_validation_or_test_target(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    held_out = {i for seq in seqs for i, _ in seq[-2:]}
    seen = {i for batch in train_batches(dm) for key in ("input_items", "next_items") for i in batch[key].flatten().tolist()}
    assert seen - {0} <= set(training_items(seqs))
    assert not seen & held_out


def test_every_training_target_appears_exactly_once_per_epoch(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    targets = [i for batch in train_batches(dm) for i in batch["next_items"].flatten().tolist() if i]
    assert len(targets) == sum(len(seq) - 2 - 1 for seq in seqs)
    assert sorted(targets) == sorted(i for seq in seqs for i, _ in seq[1:-2])


def test_training_target_is_the_next_item_after_its_input(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    where = position(seqs)
    for batch in train_batches(dm):
        has_target = batch["next_items"] > 0
        for i, t in zip(batch["input_items"][has_target].tolist(), batch["next_items"][has_target].tolist()):
            user, k = where[i]
            assert where[t] == (user, k + 1)


def test_training_windows_are_left_padded_with_the_newest_item_last(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    where = position(seqs)
    for batch in train_batches(dm):
        for row, targets in zip(batch["input_items"].tolist(), batch["next_items"].tolist()):
            n_pad = row.index(next(i for i in row if i))
            assert row[:n_pad] == [0] * n_pad and 0 not in row[n_pad:]
            ks = [where[i][1] for i in row[n_pad:]] + [where[targets[-1]][1]]
            assert ks == list(range(ks[0], ks[0] + len(ks)))  # consecutive, oldest first, newest last


def test_earlier_items_are_the_users_items_before_the_window(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    where = position(seqs)
    windows_after_the_start = 0
    for batch in train_batches(dm):
        for row, earlier in zip(batch["input_items"].tolist(), batch["earlier_items"].tolist()):
            first = next(i for i in row if i)
            user, k = where[first]
            assert nonzero(torch.tensor(earlier)) == [i for i, _ in seqs[user][:k]]
            windows_after_the_start += k > 0
    assert windows_after_the_start  # the 25-item user has windows that start after their first item


def test_a_bootstrap_resample_repeats_each_users_windows_by_their_count(tmp_path):
    dm, seqs = make_datamodule(tmp_path, train_users="bootstrap", train_users_seed=3)
    counts = dm.train_user_weights()
    assert counts.sum() == len(seqs) and (counts != 1).any()
    (tmp_path / "all").mkdir()
    everyone, _ = make_datamodule(tmp_path / "all")
    where = position(seqs)
    per_user = np.zeros(len(seqs), dtype=int)
    for batch in train_batches(dm):
        for i in batch["next_items"].flatten().tolist():
            if i:
                per_user[where[i][0]] += 1
    assert per_user.tolist() == [c * (len(seq) - 3) for c, seq in zip(counts, seqs)]
    assert everyone.train_user_weights().tolist() == [1] * len(seqs)
    # evaluation always covers every user once
    assert sorted(u for u, _, _ in eval_rows(dm, "test")) == list(range(len(seqs)))


def test_training_interactions_are_every_users_sequence_but_the_last_two(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    train = dm.training_interactions()
    assert train.item.tolist() == training_items(seqs)
    assert train.rating.tolist() == [r for seq in seqs for _, r in seq[:-2]]
    assert train.user.tolist() == [u for u, seq in enumerate(seqs) for _ in seq[:-2]]
    assert (train.weight == 1).all()


def test_target_items_are_zero_exactly_where_there_is_no_target(tmp_path):
    dm, _ = make_datamodule(tmp_path)
    for batch in train_batches(dm):
        no_target = batch["next_items"] == 0
        assert torch.equal(no_target, batch["input_items"] == 0)
        assert not batch["next_ratings"][no_target].any() and not batch["next_rewards"][no_target].any()


def test_target_ratings_are_the_ratings_of_the_target_items(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    rating = dict(i_r for seq in seqs for i_r in seq)
    for batch in train_batches(dm):
        has_target = batch["next_items"] > 0
        assert batch["next_ratings"][has_target].tolist() == [rating[i] for i in batch["next_items"][has_target].tolist()]


# ----------------------------------------------------------------------------------- rewards
def rewards_and_ratings(dm: RecDataModule) -> tuple[np.ndarray, np.ndarray]:
    batches = train_batches(dm)
    rewards = np.concatenate([b["next_rewards"][b["next_items"] > 0].numpy() for b in batches])
    ratings = np.concatenate([b["next_ratings"][b["next_items"] > 0].numpy() for b in batches])
    return rewards, ratings


def test_identity_rewards_are_the_ratings(tmp_path):
    rewards, ratings = rewards_and_ratings(make_datamodule(tmp_path)[0])
    np.testing.assert_array_equal(rewards, ratings)


def test_centered_rewards_subtract_the_mean_training_rating(tmp_path):
    dm, seqs = make_datamodule(tmp_path, reward_transform="centered")
    train_mean = np.mean([r for seq in seqs for _, r in seq[:-2]])  # validation and test ratings excluded
    rewards, ratings = rewards_and_ratings(dm)
    np.testing.assert_allclose(rewards, ratings - train_mean, rtol=1e-6)


def test_minmax_rewards_map_the_rating_range_onto_zero_to_one(tmp_path):
    rewards, ratings = rewards_and_ratings(make_datamodule(tmp_path, reward_transform="minmax")[0])
    np.testing.assert_allclose(rewards, (ratings - 1.0) / 4.0)
    assert rewards.min() >= 0.0 and rewards.max() <= 1.0


def test_unknown_reward_transform_is_rejected(tmp_path):
    path, _ = make_log(tmp_path)
    with pytest.raises(RecpostError, match="data.reward_transform must be 'identity', 'centered' or 'minmax'"):
        RecDataModule(Table(str(path)), reward_transform="center")


@pytest.mark.parametrize("threshold", [3.0, 4.5])
def test_target_liked_follows_liked_threshold(tmp_path, threshold):
    dm, seqs = make_datamodule(tmp_path, liked_threshold=threshold)
    for u, batch, b in eval_rows(dm, "test"):
        assert batch["target_liked"][b].item() == (seqs[u][-1][1] >= threshold)


# ----------------------------------------------------------------------------------- exposed facts
def test_n_items_and_item_map_hash_are_exposed(tmp_path):
    dm, seqs = make_datamodule(tmp_path)
    n = sum(len(seq) for seq in seqs)
    assert dm.n_items == n
    assert dm.item_map_hash == item_map_hash(dm.data.item_ids.data.table.column("item_id"))
    assert dm.original_item_ids([1, n]) == [str(OFFSET + 1), str(OFFSET + n)]


@pytest.mark.parametrize("max_len", [0, 1])
def test_max_len_below_two_is_rejected(tmp_path, max_len):
    path, _ = make_log(tmp_path)
    with pytest.raises(RecpostError, match=f"data.max_len must be >= 2 \\(got {max_len}\\)"):
        RecDataModule(Table(str(path)), max_len=max_len)


# ----------------------------------------------------------------------------------- length grouping
def test_length_grouped_batches_use_every_window_once_and_waste_less_padding(tmp_path):
    lengths = (3, 4, 7, 12, 25, 5, 30, 9, 14, 6, 40, 8)
    plain, _ = make_datamodule(tmp_path, lengths=lengths, batch_size=2)
    (tmp_path / "g").mkdir()
    grouped, _ = make_datamodule(tmp_path / "g", lengths=lengths, batch_size=2, length_grouping=8)
    torch.manual_seed(0)
    batches = {name: list(dm.train_dataloader()) for name, dm in (("plain", plain), ("grouped", grouped))}
    targets = {name: sorted(i for b in bs for i in b["next_items"].flatten().tolist() if i) for name, bs in batches.items()}
    assert targets["grouped"] == targets["plain"]  # the same targets, each once per epoch
    padding = {name: sum(int((b["input_items"] == 0).sum()) for b in bs) for name, bs in batches.items()}
    assert padding["grouped"] < padding["plain"]


def _epoch_sums_plain_and_grouped(tmp_path, epoch_loss, **settings):
    """``epoch_loss(model, dm)`` and its gradients for plain and length-grouped batches of the same windows,
    from the same SFT weights: ``[(loss, grads), (loss, grads)]``."""
    from recpost.methods import SFT
    from recpost.models import BackboneConfig

    lengths = (3, 4, 7, 12, 25, 5, 30, 9, 14, 6, 40, 8)
    results = []
    for grouping in (0, 8):
        folder = tmp_path / f"g{grouping}"
        folder.mkdir()
        dm, _ = make_datamodule(folder, lengths=lengths, batch_size=3, length_grouping=grouping)
        torch.manual_seed(0)
        model = SFT(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=MAX_LEN,
                    backbone=BackboneConfig(d_model=16, n_layers=2, n_heads=2, dropout=0.0), **settings)
        total = epoch_loss(model, dm)
        total.backward()
        results.append((total.detach(), [p.grad.clone() for p in model.parameters()]))
    return results


def _same(results) -> bool:
    (loss_a, grads_a), (loss_b, grads_b) = results
    return torch.allclose(loss_a, loss_b, rtol=1e-6) and all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(grads_a, grads_b))  # summation order


def test_a_length_grouped_epoch_has_the_same_per_target_losses_and_gradients(tmp_path):
    # Grouping only changes which windows share a batch (and so their padding): with the same weights,
    # the sum of every target's loss over an epoch, and its gradient, are the unbucketed epoch's.
    assert _same(_epoch_sums_plain_and_grouped(
        tmp_path, lambda model, dm: sum(model.next_item_cross_entropy(b)[0].sum() for b in dm.train_dataloader())))


@pytest.mark.parametrize("target_norm", ["batch", "dataset"])
def test_with_target_norm_dataset_a_grouped_epoch_trains_on_the_same_loss(tmp_path, target_norm):
    # The loss the optimiser sees, summed over an epoch: with target_norm: dataset every target weighs the
    # same in every batch, so grouping windows by length cannot change it (nor its gradient); with the
    # per-batch mean the few targets of a batch of short windows weigh more, and it does.
    def epoch_loss(model, dm):
        model.set_targets_per_batch(dm)
        return sum(model.training_loss(b)[0] for b in dm.train_dataloader())

    assert _same(_epoch_sums_plain_and_grouped(tmp_path, epoch_loss, target_norm=target_norm)) == (
        target_norm == "dataset")


def test_target_norm_dataset_without_the_data_is_one_clear_error(tmp_path):
    from recpost.methods import SFT
    from recpost.models import BackboneConfig

    dm, _ = make_datamodule(tmp_path)
    model = SFT(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=MAX_LEN, target_norm="dataset",
                backbone=BackboneConfig(d_model=8, n_layers=1, n_heads=1))
    with pytest.raises(RecpostError, match="target_norm: dataset needs the training data's targets per batch"):
        model.training_loss(next(iter(dm.train_dataloader())))
    with pytest.raises(RecpostError, match="model.target_norm must be one of"):
        SFT(n_items=dm.n_items, item_map_hash=dm.item_map_hash, max_len=MAX_LEN, target_norm="epoch")


def test_a_negative_length_grouping_is_one_clear_error(tmp_path):
    path, _ = make_log(tmp_path)
    with pytest.raises(RecpostError, match="data.length_grouping must be >= 0"):
        RecDataModule(Table(str(path)), length_grouping=-1)


# ----------------------------------------------------------------------------------- train_samples: prefixes
def test_prefix_samples_have_one_target_each_at_the_last_position_and_use_every_target_once(tmp_path):
    windows, seqs = make_datamodule(tmp_path)
    (tmp_path / "p").mkdir()
    prefixes, _ = make_datamodule(tmp_path / "p", train_samples="prefixes")
    n_targets = sum(len(seq) - 2 - 1 for seq in seqs)
    assert len(prefixes.train_windows()[0]) == n_targets == int(prefixes.train_window_targets().sum())
    assert int(windows.train_window_targets().sum()) == n_targets
    batches = train_batches(prefixes)
    assert all(int((b["next_items"][:, :-1] != 0).sum()) == 0 for b in batches)  # only the last position
    assert all(bool((b["next_items"][:, -1] > 0).all()) for b in batches)
    assert all(int((b["next_rewards"][:, :-1] != 0).sum()) == 0 for b in batches)  # no reward without a target
    targets = sorted(i for b in batches for i in b["next_items"].flatten().tolist() if i)
    assert targets == sorted(i for b in train_batches(windows) for i in b["next_items"].flatten().tolist() if i)


def test_a_prefix_sample_sees_the_last_max_len_items_before_its_target(tmp_path):
    dm, seqs = make_datamodule(tmp_path, train_samples="prefixes")
    where = position(seqs)
    for batch in train_batches(dm):
        for row, target in zip(batch["input_items"].tolist(), batch["next_items"][:, -1].tolist()):
            user, k = where[target]
            expected = [i for i, _ in seqs[user][max(0, k - MAX_LEN):k]]  # the full history, up to max_len
            assert nonzero(torch.tensor(row)) == expected


def test_an_unknown_train_samples_is_one_clear_error(tmp_path):
    path, _ = make_log(tmp_path)
    with pytest.raises(RecpostError, match="data.train_samples must be 'windows' or 'prefixes'"):
        RecDataModule(Table(str(path)), train_samples="users")
