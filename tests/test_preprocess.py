"""Preprocessing: order, id maps, filters, duplicates and the on-disk cache."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

import recpost.data.cache as cache
from recpost.data import Amazon, RecDataModule, Table
from recpost.core.errors import RecpostError

HEADER = "user_id,item_id,rating,timestamp\n"


def write_log(path: Path, rows: list[tuple]) -> Path:
    """A ratings CSV with a header from (user, item, rating, timestamp) rows, in the given order."""
    path.write_text(HEADER + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    return path


def build(source, cache: Path, **kwargs) -> RecDataModule:
    dm = RecDataModule(source, cache_dir=str(cache), **kwargs)
    dm.data  # noqa: B018 - preprocessing happens here
    return dm


def sequences(dm: RecDataModule) -> dict[str, list[str]]:
    """Original user id -> that user's original item ids in sequence order."""
    d = dm.data
    users = d.user_ids["user_id"]
    return {users[u]: dm.original_item_ids(d.item[d.offsets[u]:d.offsets[u + 1]]) for u in range(d.n_users)}


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != ".locks") if cache.exists() else []


# ----------------------------------------------------------------------------------- order and ids
def test_sequences_are_chronological_with_ties_in_file_order(tmp_path):
    rows = [("u", "late", 4, 30), ("u", "first", 4, 10), ("u", "tie_a", 4, 20), ("u", "tie_b", 4, 20), ("u", "tie_c", 4, 20)]
    dm = build(Table(str(write_log(tmp_path / "log.csv", rows))), tmp_path / "cache")
    assert sequences(dm) == {"u": ["first", "tie_a", "tie_b", "tie_c", "late"]}


def test_integer_item_ids_map_to_one_to_n_items_in_numeric_order(tmp_path):
    rows = [("u", 10, 4, 1), ("u", 2, 4, 2), ("u", 1, 4, 3), ("u", 30, 4, 4)]
    dm = build(Table(str(write_log(tmp_path / "log.csv", rows))), tmp_path / "cache")
    assert dm.n_items == 4
    assert dm.original_item_ids([1, 2, 3, 4]) == ["1", "2", "10", "30"]
    assert dm.data.item.tolist() == [3, 2, 1, 4]  # 0 stays free for padding


def test_string_item_ids_map_to_one_to_n_items_in_sorted_order(tmp_path):
    rows = [("u", "pear", 4, 1), ("u", "apple", 4, 2), ("u", "fig", 4, 3)]
    dm = build(Table(str(write_log(tmp_path / "log.csv", rows))), tmp_path / "cache")
    assert dm.original_item_ids([1, 2, 3]) == ["apple", "fig", "pear"]
    assert dm.data.item.tolist() == [3, 1, 2]


def test_item_map_hash_is_equal_for_the_same_catalog(tmp_path):
    a = write_log(tmp_path / "a.csv", [("u", "x", 1, 1), ("u", "y", 2, 2), ("u", "z", 3, 3)])
    b = write_log(tmp_path / "b.csv", [("v", "z", 5, 7), ("v", "x", 5, 8), ("v", "y", 4, 9), ("w", "y", 1, 1), ("w", "x", 1, 2), ("w", "z", 1, 3)])
    assert build(Table(str(a)), tmp_path / "cache").item_map_hash == build(Table(str(b)), tmp_path / "cache").item_map_hash


def test_item_map_hash_differs_when_the_catalog_differs(tmp_path):
    a = write_log(tmp_path / "a.csv", [("u", "x", 1, 1), ("u", "y", 2, 2), ("u", "z", 3, 3)])
    b = write_log(tmp_path / "b.csv", [("u", "x", 1, 1), ("u", "y", 2, 2), ("u", "q", 3, 3)])
    assert build(Table(str(a)), tmp_path / "cache").item_map_hash != build(Table(str(b)), tmp_path / "cache").item_map_hash


# ----------------------------------------------------------------------------------- filters
def test_users_with_fewer_than_three_interactions_are_dropped_and_counted(tmp_path):
    rows = [("keep", "a", 4, 1), ("keep", "b", 4, 2), ("keep", "c", 4, 3), ("two", "a", 4, 1), ("two", "b", 4, 2), ("one", "c", 4, 1)]
    dm = build(Table(str(write_log(tmp_path / "log.csv", rows))), tmp_path / "cache")
    assert list(sequences(dm)) == ["keep"]
    assert dm.data.meta["dropped_short_users"] == 2


def test_repeated_user_item_pairs_keep_only_the_first(tmp_path):
    rows = [("u", "a", 2, 1), ("u", "b", 4, 2), ("u", "a", 5, 3), ("u", "c", 4, 4)]
    dm = build(Table(str(write_log(tmp_path / "log.csv", rows))), tmp_path / "cache")
    assert sequences(dm) == {"u": ["a", "b", "c"]}
    assert dm.data.rating.tolist() == [2.0, 4.0, 4.0]


def test_keep_repeats_keeps_every_interaction_with_an_item(tmp_path):
    rows = [("u", "a", 2, 1), ("u", "b", 4, 2), ("u", "a", 5, 3), ("u", "c", 4, 4)]
    dm = build(Table(str(write_log(tmp_path / "log.csv", rows))), tmp_path / "cache", keep_repeats=True)
    assert sequences(dm) == {"u": ["a", "b", "a", "c"]}


def test_five_core_filter_repeats_until_nothing_more_is_removed(tmp_path):
    # Round 1 removes item "rare" (1 rating); only then does "weak" fall to 4 ratings and go in round 2.
    rows = [(f"U{u}", f"I{i}", 4, 10 * u + i) for u in range(5) for i in range(5)]
    rows += [("weak", f"I{i}", 3, 100 + i) for i in range(4)] + [("weak", "rare", 5, 200)]
    path = tmp_path / "ratings_Books.csv"
    path.write_text("".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    dm = build(Amazon(path=str(path)), tmp_path / "cache", min_interactions=5)
    assert sorted(sequences(dm)) == ["U0", "U1", "U2", "U3", "U4"]
    assert (dm.n_items, len(dm.data.item)) == (5, 25)


def test_no_users_left_after_filtering_is_an_error(tmp_path):
    rows = [(u, i, 4, t) for t, (u, i) in enumerate([("a", "x"), ("a", "y"), ("a", "z"), ("b", "x"), ("b", "y"), ("b", "z")])]
    with pytest.raises(RecpostError, match="no users left after filtering .*lower data.min_interactions"):
        build(Table(str(write_log(tmp_path / "log.csv", rows))), tmp_path / "cache", min_interactions=10)


# ----------------------------------------------------------------------------------- duplicates
DUPLICATED = [("u", "a", 4, 1), ("u", "b", 3, 2), ("u", "b", 3, 2), ("u", "c", 5, 3)]


def test_duplicate_rows_are_dropped_with_a_warning_by_default(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="recpost.data.interactions"):
        dm = build(Table(str(write_log(tmp_path / "log.csv", DUPLICATED))), tmp_path / "cache")
    assert sequences(dm) == {"u": ["a", "b", "c"]}
    assert any("dropped 1 duplicate (user, item, timestamp) rows (first at row 3)" in r.getMessage() for r in caplog.records)


def test_duplicate_rows_are_an_error_when_asked(tmp_path):
    with pytest.raises(RecpostError, match=r"1 duplicate \(user, item, timestamp\) rows \(first at row 3\)"):
        build(Table(str(write_log(tmp_path / "log.csv", DUPLICATED))), tmp_path / "cache", duplicates="error")


# ----------------------------------------------------------------------------------- cache
ROWS = [("u", "a", 4, 1), ("u", "b", 3, 2), ("u", "c", 5, 3)]


def test_cache_is_reused_by_a_second_datamodule(tmp_path, monkeypatch):
    source = Table(str(write_log(tmp_path / "log.csv", ROWS)))
    first = build(source, tmp_path / "cache")

    def must_not_run(*args, **kwargs):
        raise AssertionError("preprocessing ran again although the cache was valid")

    monkeypatch.setattr(cache, "preprocess", must_not_run)
    second = build(Table(str(tmp_path / "log.csv")), tmp_path / "cache")
    assert second.data.item.tolist() == first.data.item.tolist()
    assert len(cache_entries(tmp_path / "cache")) == 1


def test_cache_is_rebuilt_when_the_file_size_changes(tmp_path):
    path = write_log(tmp_path / "log.csv", ROWS)
    build(Table(str(path)), tmp_path / "cache")
    write_log(path, [*ROWS, ("u", "d", 1, 4)])
    assert sequences(build(Table(str(path)), tmp_path / "cache")) == {"u": ["a", "b", "c", "d"]}


def test_cache_is_rebuilt_when_only_the_file_mtime_changes(tmp_path):
    path = write_log(tmp_path / "log.csv", ROWS)
    build(Table(str(path)), tmp_path / "cache")
    write_log(path, [("u", "a", 1, 1), ("u", "b", 1, 2), ("u", "c", 1, 3)])  # same size, other ratings
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert build(Table(str(path)), tmp_path / "cache").data.rating.tolist() == [1.0, 1.0, 1.0]


def test_cache_is_rebuilt_when_an_option_changes(tmp_path):
    path = write_log(tmp_path / "log.csv", [*ROWS, ("u", "a", 2, 4)])
    build(Table(str(path)), tmp_path / "cache")
    assert sequences(build(Table(str(path)), tmp_path / "cache", keep_repeats=True)) == {"u": ["a", "b", "c", "a"]}
    assert len(cache_entries(tmp_path / "cache")) == 2


def test_failed_cache_write_leaves_no_entry_behind(tmp_path, monkeypatch):
    source = Table(str(write_log(tmp_path / "log.csv", ROWS)))
    real_save, calls = cache._save, []

    def save_then_crash(table, path):
        calls.append(path)
        real_save(table, path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "_save", save_then_crash)
    with pytest.raises(RecpostError, match=f"no space left on the disk of {tmp_path / 'cache'} to write the data cache "
                                           r"of table \(.* free, about .* needed\)"):
        build(source, tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


def test_bad_input_leaves_no_cache_entry_behind(tmp_path):
    path = write_log(tmp_path / "log.csv", [("u", "a", 4, 1), ("u", "b", 9, 2), ("u", "c", 5, 3)])
    with pytest.raises(RecpostError, match="outside"):
        build(Table(str(path)), tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []
