"""Sources: every official file layout reads into the canonical table; bad files fail in one line."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recpost.data import Amazon, MovieLens, RecDataModule, Table
from recpost.data.validation import validate_interactions
from recpost.core.errors import RecpostError

ROOT = Path(__file__).resolve().parents[1]

# (user, item, rating, timestamp): whole stars for 100k/1m, half stars for 20m/25m/32m/latest/latest-small.
STAR_ROWS = [(1, 31, 4, 881250949), (1, 7, 1, 881250950), (22, 31, 5, 878887116), (22, 377, 2, 878887117)]
HALF_STAR_ROWS = [(1, 296, 5.0, 1147880044), (1, 306, 3.5, 1147868817), (2, 1, 0.5, 1141415820)]

# variant -> (folder, file name, rows, file text)
LAYOUTS = {
    "100k": ("ml-100k", "u.data", STAR_ROWS, lambda rows: "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)),
    "1m": ("ml-1m", "ratings.dat", STAR_ROWS, lambda rows: "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows)),
    **{
        v: (f"ml-{v}", "ratings.csv", HALF_STAR_ROWS,
            lambda rows: "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
        for v in ("20m", "25m", "32m", "latest", "latest-small")
    },
}


def canonical_rows(source) -> list[tuple]:
    """What a source reads, validated and typed, as (user_id, item_id, timestamp, rating) tuples."""
    table = validate_interactions(source.load(), "test", source.rating_range)
    return list(zip(*(table.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp", "rating"))))


def expected_rows(rows) -> list[tuple]:
    return [(str(u), str(i), t, float(r)) for u, i, r, t in rows]


def write_extracted(root: Path, variant: str) -> list:
    folder, name, rows, render = LAYOUTS[variant]
    (root / folder).mkdir(parents=True)
    (root / folder / name).write_text(render(rows))
    return rows


def write_zip(root: Path, variant: str) -> list:
    folder, name, rows, render = LAYOUTS[variant]
    with zipfile.ZipFile(root / f"{folder}.zip", "w") as zf:
        zf.writestr(f"{folder}/README", "official archive layout")
        zf.writestr(f"{folder}/{name}", render(rows))
    return rows


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def build(source, tmp_path: Path, **kwargs) -> RecDataModule:
    """A DataModule with its own cache folder, its interactions already built."""
    dm = RecDataModule(source, cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.data  # noqa: B018 - validation and preprocessing happen here
    return dm


HEADER = "user_id,item_id,rating,timestamp\n"


# ----------------------------------------------------------------------------------- MovieLens
@pytest.mark.parametrize("variant", list(LAYOUTS))
def test_movielens_reads_the_extracted_folder(tmp_path, variant):
    rows = write_extracted(tmp_path, variant)
    assert canonical_rows(MovieLens(variant, root=str(tmp_path), download=False)) == expected_rows(rows)


@pytest.mark.parametrize("variant", list(LAYOUTS))
def test_movielens_reads_the_official_zip(tmp_path, variant):
    rows = write_zip(tmp_path, variant)
    assert canonical_rows(MovieLens(variant, root=str(tmp_path), download=False)) == expected_rows(rows)


@pytest.mark.parametrize("variant", list(LAYOUTS))
def test_movielens_without_folder_or_zip_names_the_expected_path(tmp_path, variant):
    folder, name, _, _ = LAYOUTS[variant]
    with pytest.raises(RecpostError, match="not found") as info:
        MovieLens(variant, root=str(tmp_path), download=False).load()
    message = str(info.value)
    assert str(tmp_path / folder / name) in message and str(tmp_path / f"{folder}.zip") in message
    assert "\n" not in message


def test_movielens_zip_without_the_ratings_file_is_rejected(tmp_path):
    with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w") as zf:
        zf.writestr("ml-1m/movies.dat", "1::Toy Story (1995)::Animation\n")
    with pytest.raises(RecpostError, match="has no ml-1m/ratings.dat"):
        MovieLens("1m", root=str(tmp_path), download=False).load()


def test_real_movielens_100k_has_the_published_counts(ml100k_root, tmp_path):
    dm = build(MovieLens("100k", root=str(ml100k_root), download=False), tmp_path)
    ratings, counts = np.unique(dm.data.rating, return_counts=True)
    assert (dm.data.n_users, dm.n_items, len(dm.data.item)) == (943, 1682, 100_000)
    assert dict(zip(ratings.tolist(), counts.tolist())) == {1.0: 6110, 2.0: 11370, 3.0: 27145, 4.0: 34174, 5.0: 21201}


# ----------------------------------------------------------------------------------- Amazon
def test_amazon_reads_the_ratings_only_csv_with_string_ids(tmp_path):
    path = write_csv(tmp_path / "ratings_Books.csv", "AKM1MP6P0OYPR,0132793040,5.0,1365811200\nA2CX7LUOHB2NDG,0321732944,5.0,1341100800\n")
    assert canonical_rows(Amazon(path=str(path))) == [
        ("AKM1MP6P0OYPR", "0132793040", 1365811200, 5.0),
        ("A2CX7LUOHB2NDG", "0321732944", 1341100800, 5.0),
    ]


def test_amazon_ids_made_of_digits_keep_their_leading_zeros(tmp_path):
    path = write_csv(tmp_path / "ratings_Books.csv", "1001,0000013714,4,1\n1002,0000013714,5,2\n")
    assert [(u, i) for u, i, _, _ in canonical_rows(Amazon(path=str(path)))] == [("1001", "0000013714"), ("1002", "0000013714")]


def test_amazon_finds_its_file_under_root_by_category(tmp_path):
    (tmp_path / "amazon").mkdir()
    write_csv(tmp_path / "amazon" / "ratings_Beauty.csv", "A1,B1,3,10\n")
    assert canonical_rows(Amazon(category="Beauty", root=str(tmp_path))) == [("A1", "B1", 10, 3.0)]


def test_amazon_missing_file_names_the_expected_path(tmp_path):
    with pytest.raises(RecpostError, match=f"Amazon ratings file not found: {tmp_path / 'amazon' / 'ratings_Books.csv'}"):
        Amazon(root=str(tmp_path)).load()


# The Amazon review dumps as published: JSON lines with many fields besides the four read; 2018's
# optional fields (vote, style with varying keys, image) come and go from row to row.
REVIEWS_2014 = [
    {"reviewerID": "A2SUAM1J3GNN3B", "asin": "0000013714", "reviewerName": "J. McDonald", "helpful": [2, 3],
     "reviewText": "I bought this for my husband, who plays the piano.", "overall": 5.0,
     "summary": "Heavenly Highway Hymns", "unixReviewTime": 1252800000, "reviewTime": "09 13, 2009"},
    {"reviewerID": "AWYPSL1T5L6XE", "asin": "B000GFDAUG", "helpful": [0, 0], "reviewText": "Fine.",
     "overall": 3.0, "summary": "ok", "unixReviewTime": 1384041600, "reviewTime": "11 10, 2013"},
]
REVIEWS_2018 = [
    {"overall": 5.0, "verified": True, "reviewTime": "10 17, 2015", "reviewerID": "A1HP7NVNPFMA4N",
     "asin": "0700026657", "reviewerName": "Ambrosia075", "reviewText": "This game is a bit hard.",
     "summary": "but when you do it's great.", "unixReviewTime": 1445040000},
    {"overall": 2.0, "vote": "1,234", "verified": False, "reviewTime": "07 27, 2015", "reviewerID": "A1JGAP0185YJI6",
     "asin": "0700026657", "style": {"Format:": " Hardcover"}, "reviewText": "Meh", "unixReviewTime": 1437955200},
    {"image": ["https://images-na.ssl-images-amazon.com/images/I/71eG75FTJJL._SY88.jpg"], "overall": 4.0,
     "reviewerID": "A3KYZBWL2SN5J4", "asin": "B00004SVFT", "style": {"Size:": " 3 oz", "Color:": " Red"},
     "unixReviewTime": 1208476800},
]
REVIEW_FILES = {  # (release, file) -> official file name of the Books dump
    (2014, "reviews"): "reviews_Books.json.gz", (2014, "reviews_5core"): "reviews_Books_5.json.gz",
    (2018, "reviews"): "Books.json.gz", (2018, "reviews_5core"): "Books_5.json.gz",
}


def review_rows(reviews: list[dict]) -> list[tuple]:
    return [(r["reviewerID"], r["asin"], r["unixReviewTime"], r["overall"]) for r in reviews]


def write_reviews(path: Path, reviews: list[dict]) -> Path:
    """JSON lines as published: gzip when the name ends in .gz, plain otherwise."""
    text = "".join(json.dumps(r) + "\n" for r in reviews).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    return path


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize(("release", "file"), list(REVIEW_FILES))
def test_amazon_reads_the_review_dumps_by_their_official_names(tmp_path, release, file, gz):
    reviews = REVIEWS_2014 if release == 2014 else REVIEWS_2018
    name = REVIEW_FILES[release, file]
    write_reviews(tmp_path / "amazon" / (name if gz else name.removesuffix(".gz")), reviews)
    source = Amazon(category="Books", file=file, release=release, root=str(tmp_path))
    assert canonical_rows(source) == review_rows(reviews)


def test_amazon_reads_a_review_dump_given_by_path(tmp_path):
    path = write_reviews(tmp_path / "my-reviews.jsonl", REVIEWS_2018)
    assert canonical_rows(Amazon(file="reviews", release=2018, path=str(path))) == review_rows(REVIEWS_2018)


def test_amazon_2018_ratings_csv_is_item_first(tmp_path):
    (tmp_path / "amazon").mkdir()
    write_csv(tmp_path / "amazon" / "Books.csv", "0001713353,A1C6M8LCIX4M6M,5.0,1123804800\n0001713353,A1REUF3A1YCPHM,4.0,1112140800\n")
    assert canonical_rows(Amazon(release=2018, root=str(tmp_path))) == [
        ("A1C6M8LCIX4M6M", "0001713353", 1123804800, 5.0),
        ("A1REUF3A1YCPHM", "0001713353", 1112140800, 4.0),
    ]


def test_amazon_review_dump_trains_through_the_datamodule(tmp_path):
    users = [f"A{u:05d}" for u in range(4)]
    reviews = [{"reviewerID": u, "asin": f"B{(i * 7 + n) % 9:09d}", "overall": float(1 + (i + n) % 5),
                "unixReviewTime": 1_400_000_000 + 86_400 * i, "reviewText": "..."} for n, u in enumerate(users) for i in range(5)]
    write_reviews(tmp_path / "amazon" / "reviews_Books_5.json.gz", reviews)
    dm = build(Amazon(file="reviews_5core", root=str(tmp_path)), tmp_path, max_len=4)
    assert (dm.data.n_users, len(dm.data.item)) == (4, 20)
    assert dm.train_batch([0])["input_items"].shape[1] <= 4


def test_amazon_missing_review_dump_names_both_spellings(tmp_path):
    with pytest.raises(RecpostError, match="Amazon review dump not found") as info:
        Amazon(file="reviews_5core", release=2018, root=str(tmp_path)).load()
    assert str(tmp_path / "amazon" / "Books_5.json.gz") in str(info.value)
    assert str(tmp_path / "amazon" / "Books_5.json") in str(info.value)


def test_amazon_review_dump_that_is_not_json_is_one_line(tmp_path):
    path = tmp_path / "amazon" / "reviews_Books_5.json"
    path.parent.mkdir()
    path.write_text("{'reviewerID': 'A1', 'asin': 'B1', 'overall': 5.0, 'unixReviewTime': 1}\n")  # Python, not JSON
    with pytest.raises(RecpostError, match="cannot read .*reviews_Books_5.json as JSON lines") as info:
        Amazon(file="reviews_5core", root=str(tmp_path)).load()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------- Table
def test_table_reads_a_csv_with_header_through_the_column_mapping(tmp_path):
    path = write_csv(tmp_path / "log.csv", "ts,who,what,stars,extra\n100,alice,x1,4.5,ignored\n90,bob,x2,2,ignored\n")
    source = Table(str(path), user_col="who", item_col="what", rating_col="stars", timestamp_col="ts")
    assert canonical_rows(source) == [("alice", "x1", 100, 4.5), ("bob", "x2", 90, 2.0)]


def test_table_reads_a_csv_without_header_as_user_item_rating_timestamp(tmp_path):
    path = write_csv(tmp_path / "log.tsv", "alice\tx1\t4\t100\nbob\tx2\t2\t90\n")
    source = Table(str(path), header=False, delimiter="\t")
    assert canonical_rows(source) == [("alice", "x1", 100, 4.0), ("bob", "x2", 90, 2.0)]


def test_table_reads_parquet(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"uid": [7, 8], "iid": [70, 80], "r": [5.0, 1.0], "t": [3, 4]}), path)
    source = Table(str(path), user_col="uid", item_col="iid", rating_col="r", timestamp_col="t")
    assert canonical_rows(source) == [("7", "70", 3, 5.0), ("8", "80", 4, 1.0)]


def test_table_reads_json_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"user_id": "alice", "item_id": "x1", "rating": 3, "timestamp": 5},
        {"user_id": "bob", "item_id": "x2", "rating": 4, "timestamp": 6},
    ]) + "\n")
    assert canonical_rows(Table(str(path))) == [("alice", "x1", 5, 3.0), ("bob", "x2", 6, 4.0)]


def test_table_with_an_unknown_extension_asks_for_the_format(tmp_path):
    path = write_csv(tmp_path / "log.dat", HEADER + "u,i,4,1\n")
    with pytest.raises(RecpostError, match="cannot tell the format .* set data.source.format"):
        Table(str(path)).load()


# ----------------------------------------------------------------------------------- bad input
def test_missing_table_file_is_named(tmp_path):
    with pytest.raises(RecpostError, match=f"interactions file not found: {tmp_path / 'nope.csv'}"):
        build(Table(str(tmp_path / "nope.csv")), tmp_path)


def test_comma_file_read_as_tab_separated_is_a_delimiter_error(tmp_path):
    (tmp_path / "ml-100k").mkdir()
    write_csv(tmp_path / "ml-100k" / "u.data", "1,31,4,881250949\n2,7,1,881250950\n")
    with pytest.raises(RecpostError, match=r"cannot parse .*u.data as '\\t'-separated values.*check the delimiter"):
        build(MovieLens("100k", root=str(tmp_path), download=False), tmp_path)


def test_header_file_with_the_wrong_delimiter_reports_missing_columns(tmp_path):
    path = write_csv(tmp_path / "log.csv", HEADER + "u,i,4,1\n")
    with pytest.raises(RecpostError, match=r"missing \['user_id', 'item_id', 'timestamp', 'rating'\]; check the delimiter"):
        build(Table(str(path), delimiter=";"), tmp_path)


def test_missing_column_is_named(tmp_path):
    path = write_csv(tmp_path / "log.csv", "user_id,item_id,rating\nu,i,4\n")
    with pytest.raises(RecpostError, match=r"missing \['timestamp'\]"):
        build(Table(str(path)), tmp_path)


def test_non_numeric_rating_is_rejected(tmp_path):
    path = write_csv(tmp_path / "log.csv", HEADER + "u,a,4,1\nu,b,good,2\nu,c,5,3\n")
    with pytest.raises(RecpostError, match="rating column is not numeric .*'good'"):
        build(Table(str(path)), tmp_path)


def test_nan_rating_is_rejected_with_its_row(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "rating": [4.0, math.nan, 5.0], "timestamp": [1, 2, 3]}), path)
    with pytest.raises(RecpostError, match="missing or NaN rating in row 2"):
        build(Table(str(path)), tmp_path)


def test_missing_rating_is_rejected_with_its_row(tmp_path):
    path = write_csv(tmp_path / "log.csv", HEADER + "u,a,4,1\nu,b,,2\nu,c,5,3\n")
    with pytest.raises(RecpostError, match="missing or NaN rating in row 2"):
        build(Table(str(path)), tmp_path)


def test_rating_outside_the_range_is_rejected(tmp_path):
    path = write_csv(tmp_path / "log.csv", HEADER + "u,a,4,1\nu,b,6,2\nu,c,5,3\n")
    with pytest.raises(RecpostError, match=r"rating 6.0 in row 2 is outside \[1.0, 5.0\]"):
        build(Table(str(path)), tmp_path)


def test_half_star_below_the_movielens_20m_range_is_rejected(tmp_path):
    (tmp_path / "ml-20m").mkdir()
    write_csv(tmp_path / "ml-20m" / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,0.5,10\n1,3,0.0,11\n")
    with pytest.raises(RecpostError, match=r"ratings.csv: rating 0.0 in row 2 is outside \[0.5, 5.0\]"):
        build(MovieLens("20m", root=str(tmp_path), download=False), tmp_path)


def test_missing_timestamp_is_rejected_with_its_row(tmp_path):
    path = write_csv(tmp_path / "log.csv", HEADER + "u,a,4,1\nu,b,3,\nu,c,5,3\n")
    with pytest.raises(RecpostError, match="missing timestamp in row 2"):
        build(Table(str(path)), tmp_path)


def test_negative_timestamp_is_rejected_with_its_row(tmp_path):
    path = write_csv(tmp_path / "log.csv", HEADER + "u,a,4,1\nu,b,3,2\nu,c,5,-7\n")
    with pytest.raises(RecpostError, match="negative timestamp -7 in row 3"):
        build(Table(str(path)), tmp_path)


def test_missing_user_id_is_rejected_with_its_row(tmp_path):
    path = write_csv(tmp_path / "log.csv", HEADER + "u,a,4,1\n,b,3,2\nu,c,5,3\n")
    with pytest.raises(RecpostError, match="missing user_id in row 2"):
        build(Table(str(path)), tmp_path)


def test_cli_with_missing_movielens_prints_one_error_line_and_exits_2(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    env = {**os.environ, "RECPOST_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "recpost", "fit", "--config", "configs/data/ml100k.yaml",
         "--config", "configs/method/sft.yaml", "--config", "configs/trainer/cpu.yaml",
         "--data.source.init_args.root", str(empty), "--data.source.init_args.download", "false",
         "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "runs")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines) == 1 and str(empty / "ml-100k" / "u.data") in error_lines[0]
    assert "Traceback" not in proc.stderr
