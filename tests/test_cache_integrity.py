"""The interactions cache cannot lie: everything that decides its contents keys it, every load checks it
against its meta.json, a damaged entry is rebuilt with one warning, dead builds leave nothing behind, and a
full disk is one line (issue 27)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from pathlib import Path

import pyarrow as pa
import pytest

from recpost.core.errors import RecpostError
from recpost.data import Amazon, MovieLens, RecDataModule, Simulator, Table
from tests.helpers import write_tiny_interactions

N_USERS = 300  # ~3,000 rows: three record batches of 1,000 in the cached Arrow file


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def loaded(source, cache: Path, **kw) -> RecDataModule:
    dm = RecDataModule(source, cache_dir=str(cache), **kw)
    dm.data  # noqa: B018 - the cache is built and opened here
    return dm


def cached_arrow(cache: Path) -> Path:
    (entry,) = entries(cache)
    return next((entry / "interactions").glob("*.arrow"))


def record_batch_ends(arrow: Path) -> list[int]:
    """The byte offset after each record batch of an Arrow IPC stream file."""
    ends = []
    with pa.OSFile(str(arrow)) as fh:
        reader = pa.ipc.MessageReader.open_stream(fh)
        while True:
            try:
                message = reader.read_next_message()
            except StopIteration:
                break
            if message is None:
                break
            if message.type == "record batch":
                ends.append(fh.tell())
    return ends


def damaged_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


# ----------------------------------------------------------------------------------- the key
def _cache_entry(source, **options) -> str:
    from recpost.data.cache import cache_key
    from recpost.data.interactions import PreprocessOptions

    return f"{source.name}-{cache_key(source, PreprocessOptions(**options))}"


def test_every_source_option_changes_the_cache_entry_or_cannot_change_what_is_read(tmp_path):
    """Each source's every __init__ option (and every preprocessing option) is listed here with another value;
    changing it must give another cache entry. A new option without an entry here fails the test."""
    from recpost.data.interactions import PreprocessOptions
    from recpost.data.simulator import WorldConfig

    csv = write_tiny_interactions(tmp_path / "t.csv", n_users=5)
    other_csv = write_tiny_interactions(tmp_path / "u.csv", n_users=6)
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text("1\t1\t5\t1\n")
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ratings.dat").write_text("1::1::5::1\n")
    (tmp_path / "other" / "ml-100k").mkdir(parents=True)
    (tmp_path / "other" / "ml-100k" / "u.data").write_text("1\t1\t4\t1\n")
    (tmp_path / "amazon").mkdir()
    for name in ("ratings_Books.csv", "ratings_Music.csv", "Books.csv", "reviews_Books.json"):
        (tmp_path / "amazon" / name).write_text(f"u,i,5,{len(name)}\n")
    (tmp_path / "other" / "amazon").mkdir()
    (tmp_path / "other" / "amazon" / "ratings_Books.csv").write_text("u,i,4,1\n")
    root, other_root = str(tmp_path), str(tmp_path / "other")
    # What does not change what is read: MovieLens' download (used only when the file is missing).
    unread = {(MovieLens, "download")}
    cases = {
        Table: ({"path": str(csv)}, {
            "path": str(other_csv), "format": "jsonl", "user_col": "item_id", "item_col": "user_id", "rating_col": "r",
            "timestamp_col": "t", "delimiter": ";", "header": False, "rating_range": (0.0, 10.0),
            "timestamp_unit": "ms", "name": "other"}),
        MovieLens: ({"variant": "100k", "root": root}, {"variant": "1m", "root": other_root}),
        Amazon: ({"root": root}, {"category": "Music", "file": "reviews", "release": 2018, "path": str(other_csv),
                                  "root": other_root}),
        Simulator: ({}, {"world": WorldConfig(seed=1), "min_seq_len": 5, "max_seq_len": 50}),
    }
    for cls, (base, changed) in cases.items():
        options = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert options == set(changed) | {o for c, o in unread if c is cls}, f"{cls.__name__}: list every option here"
        reference = _cache_entry(cls(**base))
        for option, value in changed.items():
            assert _cache_entry(cls(**{**base, option: value})) != reference, f"{cls.__name__}.{option}"
    world = WorldConfig()
    for field in dataclasses.fields(WorldConfig):
        value = getattr(world, field.name)
        other = (not value if isinstance(value, bool) else value + 1 if isinstance(value, (int, float)) else None)
        if other is None:
            continue
        try:
            source = Simulator(dataclasses.replace(world, **{field.name: other}))
        except (RecpostError, ValueError):
            continue  # a value this setting refuses; its neighbour is checked by the simulator's own tests
        assert _cache_entry(source) != _cache_entry(Simulator()), f"WorldConfig.{field.name}"
    for field in dataclasses.fields(PreprocessOptions):
        value = getattr(PreprocessOptions(), field.name)
        other = {"min_interactions": 5, "duplicates": "error", "keep_repeats": True}[field.name]
        assert other != value and _cache_entry(Table(str(csv)), **{field.name: other}) != _cache_entry(Table(str(csv)))


def test_a_cache_built_under_a_wider_rating_range_is_not_reused_for_a_narrower_one(tmp_path):
    csv = tmp_path / "r.csv"
    write_tiny_interactions(csv)
    lines = csv.read_text().splitlines()
    user, item, _, ts = lines[44].split(",")
    lines[44] = f"{user},{item},7,{ts}"
    csv.write_text("\n".join(lines) + "\n")
    assert loaded(Table(str(csv), rating_range=(1, 10)), tmp_path / "cache").data.rating.max() == 7
    with pytest.raises(RecpostError, match=r"rating 7.0 in row 44 is outside \[1.0, 5.0\]"):
        loaded(Table(str(csv)), tmp_path / "cache")


# ----------------------------------------------------------------------------------- damage found on load
def test_an_arrow_file_truncated_at_a_record_batch_boundary_is_rebuilt_with_one_warning(tmp_path, caplog):
    csv = write_tiny_interactions(tmp_path / "t.csv", n_users=N_USERS)
    rows = len(loaded(Table(str(csv)), tmp_path / "cache").data.item)
    arrow = cached_arrow(tmp_path / "cache")
    ends = record_batch_ends(arrow)
    assert len(ends) >= 2, "the fixture should span several record batches"
    arrow.write_bytes(arrow.read_bytes()[:ends[-2]])  # a whole batch gone: Arrow still reads the rest
    with caplog.at_level(logging.WARNING):
        dm = loaded(Table(str(csv)), tmp_path / "cache")
    assert len(dm.data.item) == rows
    assert len(damaged_warnings(caplog)) == 1 and str(arrow.parents[1]) in damaged_warnings(caplog)[0]


def _damage(entry: Path, how: str) -> None:
    arrow = next((entry / "interactions").glob("*.arrow"))
    if how == "truncated_mid_batch":
        arrow.write_bytes(arrow.read_bytes()[:record_batch_ends(arrow)[0] + 100])
    elif how == "bytes_changed_in_place":  # same size: only the hash tells
        raw = bytearray(arrow.read_bytes())
        raw[-200:-190] = bytes(b ^ 0xFF for b in raw[-200:-190])
        arrow.write_bytes(bytes(raw))
    elif how == "no_meta_json":
        (entry / "meta.json").unlink()
    elif how == "meta_json_unreadable":
        (entry / "meta.json").write_text("{not json")
    elif how == "file_missing":
        (entry / "users" / "state.json").unlink()
    elif how == "counts_edited":
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps({**meta, "rows": meta["rows"] + 1}))


@pytest.mark.parametrize("how", ["truncated_mid_batch", "bytes_changed_in_place", "no_meta_json",
                                 "meta_json_unreadable", "file_missing", "counts_edited"])
def test_a_damaged_entry_is_rebuilt_with_one_warning_never_trusted(tmp_path, caplog, how):
    csv = write_tiny_interactions(tmp_path / "t.csv")
    first = loaded(Table(str(csv)), tmp_path / "cache").data
    (entry,) = entries(tmp_path / "cache")
    _damage(entry, how)
    with caplog.at_level(logging.WARNING):
        again = loaded(Table(str(csv)), tmp_path / "cache").data
    assert again.item.tolist() == first.item.tolist() and again.timestamp.tolist() == first.timestamp.tolist()
    assert len(damaged_warnings(caplog)) == 1 and str(entry) in damaged_warnings(caplog)[0]
    assert entries(tmp_path / "cache") == [entry]
    caplog.clear()
    loaded(Table(str(csv)), tmp_path / "cache")  # the rebuilt entry is whole
    assert damaged_warnings(caplog) == []


# ----------------------------------------------------------------------------------- dead builds, full disk
def test_temporary_folders_of_dead_builds_are_removed_and_those_of_running_builds_kept(tmp_path):
    from filelock import FileLock

    from recpost.data.cache import build_cache
    from recpost.data.interactions import PreprocessOptions

    cache = tmp_path / "cache"
    (cache / ".locks").mkdir(parents=True)
    dead = cache / ".t-0123456789ab-k1ll3d9x"  # what a build killed with kill -9 leaves
    running = cache / ".t-ba9876543210-runn1ng0"
    users_own = cache / ".my-notes"  # not a build's: never touched
    for folder in (dead, running, users_own):
        (folder / "interactions").mkdir(parents=True)
    with FileLock(str(cache / ".locks" / "t-ba9876543210.lock")):  # that build still runs
        build_cache(Table(str(write_tiny_interactions(tmp_path / "t.csv")), name="t"), PreprocessOptions(), cache)
    assert not dead.exists() and running.exists() and users_own.exists()
    assert len(entries(cache)) == 1


def test_a_full_disk_is_one_line_naming_the_cache_folder_and_the_space_needed(tmp_path, monkeypatch):
    import recpost.core.files as files

    monkeypatch.setattr(files, "free_bytes", lambda folder: 4096)
    with pytest.raises(RecpostError, match=rf"^no space left on the disk of {tmp_path / 'cache'} to write the data cache "
                                           r"of tiny \(4.1 KB free, about 1.\d MB needed\)"):
        loaded(Table(str(write_tiny_interactions(tmp_path / "t.csv")), name="tiny"), tmp_path / "cache")
    assert entries(tmp_path / "cache") == [] and [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]
