"""One unit for time (integer unix seconds whatever the input form; ambiguous input refused), table formats
recognised from the file name (gzip included), and the message when no user is long enough (issue 27)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recpost.core.errors import RecpostError
from recpost.data import RecDataModule, Table

INSTANT = 1_714_566_600  # 2024-05-01T12:30:00Z


def write_log(path: Path, timestamps: list, n_users: int = 4, per_user: int = 4) -> Path:
    """A CSV of ``n_users`` users with ``per_user`` interactions each; row r gets ``timestamps[r]``."""
    rows = [f"u{r // per_user},i{r % per_user},4,{timestamps[r]}" for r in range(n_users * per_user)]
    path.write_text("user_id,item_id,rating,timestamp\n" + "\n".join(rows) + "\n")
    return path


def loaded_timestamps(source, tmp_path: Path) -> list[int]:
    dm = RecDataModule(source, cache_dir=str(tmp_path / "cache"))
    return sorted(dm.data.timestamp.tolist())


# ----------------------------------------------------------------------------------- time
def test_one_fractional_iso_timestamp_among_whole_seconds_keeps_the_column_in_seconds(tmp_path):
    stamps = [f"2024-05-01T12:{m:02d}:00" for m in range(16)]
    stamps[5] = "2024-05-01T12:05:00.750"  # once Arrow read such a column as nanoseconds (1.7e18)
    got = loaded_timestamps(Table(str(write_log(tmp_path / "t.csv", stamps))), tmp_path)
    assert got == [INSTANT - 30 * 60 + 60 * m for m in range(16)]


@pytest.mark.parametrize("values", [
    [INSTANT], [INSTANT * 1000], [INSTANT * 10**6 + 999_999], [INSTANT * 10**9 + 5], [INSTANT + 0.9],
    ["2024-05-01T12:30:00Z"], ["2024-05-01T14:30:00+02:00"], ["2024-05-01T12:30:00.999999"], ["2024-05-01 12:30:00"],
    [str(INSTANT)], [f"{INSTANT}000"],
], ids=["s", "ms", "us", "ns", "float_s", "iso_z", "iso_offset", "iso_fraction", "iso_space", "text_s", "text_ms"])
def test_every_form_of_one_instant_is_the_same_integer_seconds(values):
    from recpost.core.timestamps import unix_seconds

    assert unix_seconds(pa.array(values), "t").to_pylist() == [INSTANT]


def test_arrow_timestamps_and_iso_dates_are_seconds_too(tmp_path):
    from recpost.core.timestamps import unix_seconds

    assert unix_seconds(pa.array(["2024-05-01"]), "t").to_pylist() == [INSTANT - 45_000]  # midnight UTC
    stamped = pa.array([INSTANT * 1000 + 1], pa.timestamp("ms", tz="Europe/Paris"))
    assert unix_seconds(stamped, "t").to_pylist() == [INSTANT]
    table = pa.table({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "rating": [4.0] * 3,
                      "timestamp": pa.array([INSTANT * 10**6 + k for k in range(3)], pa.timestamp("us"))})
    pq.write_table(table, tmp_path / "t.parquet")
    assert loaded_timestamps(Table(str(tmp_path / "t.parquet")), tmp_path) == [INSTANT] * 3


def test_dates_and_declared_milliseconds_load_as_seconds(tmp_path):
    days = [f"2024-05-{d:02d}" for d in range(1, 17)]
    assert loaded_timestamps(Table(str(write_log(tmp_path / "d.csv", days))), tmp_path / "d")[:2] == [
        INSTANT - 45_000, INSTANT - 45_000 + 86_400]
    small_ms = write_log(tmp_path / "ms.csv", [1000 * k for k in range(16)])  # too small to tell from seconds
    assert loaded_timestamps(Table(str(small_ms), timestamp_unit="ms"), tmp_path / "ms")[-1] == 15
    assert loaded_timestamps(Table(str(small_ms)), tmp_path / "auto")[-1] == 15_000  # auto: small numbers are seconds


@pytest.mark.parametrize("timestamps, message", [
    ([INSTANT] * 15 + [INSTANT * 1000], r"the timestamps run from 1714566600 to 1714566600000, which fits no single unit"),
    ([5] * 15 + [INSTANT * 1000], "which fits no single unit"),
    (["2024-05-01"] * 15 + ["yesterday"], "timestamp 'yesterday' in row 16 is neither a number nor an ISO date"),
    (["1999-12-31T23:59:59"] * 15 + ["1969-12-31"], r"negative timestamp -86400 in row 16"),
], ids=["seconds_and_ms", "order_keys_and_ms", "not_a_date", "before_1970"])
def test_ambiguous_or_unreadable_timestamps_are_one_line_saying_how_to_fix_them(tmp_path, timestamps, message):
    with pytest.raises(RecpostError, match=message) as info:
        loaded_timestamps(Table(str(write_log(tmp_path / "t.csv", timestamps))), tmp_path)
    assert "\n" not in str(info.value)
    if "single unit" in message:
        assert "set data.source.timestamp_unit to s, ms, us or ns" in str(info.value)


def test_recommend_histories_follow_the_loaders_rule():
    from recpost.serving.pretrained import History, in_seconds

    given = [History("a", ["1", "2"], timestamps=[INSTANT * 1000, INSTANT * 1000 + 60_000]),
             History("b", ["3"], timestamps=[INSTANT * 1000 + 1]), History("c", ["4"])]
    assert [h.timestamps for h in in_seconds(given)] == [[INSTANT, INSTANT + 60], [INSTANT], None]
    iso = [History("a", ["1"], timestamps=["2024-05-01T12:30:00.5Z"])]
    assert in_seconds(iso)[0].timestamps == [INSTANT]
    with pytest.raises(RecpostError, match="fits no single unit.*set --timestamp_unit"):
        in_seconds([History("a", ["1", "2"], timestamps=[INSTANT, INSTANT * 1000])], declare="--timestamp_unit")


# ----------------------------------------------------------------------------------- formats and filters
@pytest.mark.parametrize("name", ["log.csv.gz", "log.CSV.GZ", "log.tsv.gz", "log.jsonl.gz"])
def test_gzip_is_detected_from_the_file_name(tmp_path, name):
    rows = [(f"u{r // 4}", f"i{r % 4}", 4, INSTANT + r) for r in range(16)]
    if "jsonl" in name:
        text = "".join(f'{{"user_id": "{u}", "item_id": "{i}", "rating": {x}, "timestamp": {t}}}\n' for u, i, x, t in rows)
    else:
        sep = "\t" if "tsv" in name else ","
        text = sep.join(["user_id", "item_id", "rating", "timestamp"]) + "\n" + "".join(
            sep.join(map(str, row)) + "\n" for row in rows)
    with gzip.open(tmp_path / name, "wt") as fh:
        fh.write(text)
    assert loaded_timestamps(Table(str(tmp_path / name)), tmp_path) == [INSTANT + r for r in range(16)]


def test_an_unknown_extension_lists_the_known_ones(tmp_path):
    (tmp_path / "log.dat.gz").write_bytes(b"")
    with pytest.raises(RecpostError, match=r"cannot tell the format of .*log.dat.gz from its extension \(.csv, .tsv.*"
                                           r"each optionally followed by .gz\); set data.source.format"):
        Table(str(tmp_path / "log.dat.gz")).fingerprint()


def test_no_user_long_enough_without_a_filter_does_not_suggest_lowering_it(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("user_id,item_id,rating,timestamp\nu1,a,4,1\nu1,b,4,2\nu1,a,5,3\nu2,a,3,1\n")
    with pytest.raises(RecpostError) as info:
        loaded_timestamps(Table(str(path)), tmp_path)
    message = str(info.value)
    assert "no user has 3 or more interactions" in message and "min_interactions" not in message
    assert "1 repeated (user, item) rows were dropped, data.keep_repeats: true keeps them" in message
