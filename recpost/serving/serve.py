"""``recpost recommend``: top-k items for the histories of new users, from an exported model folder.

Histories come as JSON lines or a long CSV (the formats users already have: an event log, or one
user per line), and recommendations go out as JSON lines or CSV, in the source's item ids. Scoring is
``recpost.serving.pretrained.PretrainedRecommender``; this module only reads, writes and reports.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pacsv

from recpost.core.errors import RecpostError
from recpost.core.files import write_text
from recpost.serving.pretrained import DEFAULT_BATCH_SIZE, History, Recommendation, as_history, in_seconds, load_pretrained

REPORTED_USERS = 10  # users with unknown items listed one per line on stderr; the rest are counted
SCORE_DIGITS = 6  # significant digits of the scores written out (fp32 logits carry about 7)


def recommend(
    model: str,
    histories: str,
    k: int = 10,
    format: Literal["jsonl", "csv"] = "jsonl",
    out: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns"] = "auto",
) -> None:
    """Top-k unseen items for the histories of new users, in source ids, from an exported model folder.

    Args:
        model: a folder written by ``recpost export``.
        histories: JSON lines, one user each (``{"user_id": "u1", "items": [50, 172], "timestamps": [...],
            "ratings": [...]}``, the last two optional), or a CSV with a header ``user_id,item_id[,timestamp,rating]``,
            one row per event, each user's rows in time order. ``.csv`` is read as CSV, anything else as JSON lines.
        k: items per user.
        format: output: JSON lines (``user_id``, ``items``, ``scores``, ``unknown_items``) or CSV rows
            ``user_id,rank,item_id,score``.
        out: output file (written whole or not at all); default: standard output.
        batch_size: users scored together.
        timestamp_unit: the unit of numeric timestamps; ``auto`` detects it from their size, as the data loader does
            (ISO dates and date-times need none). The model reads them as unix seconds, as it was trained.
    """
    if k < 1 or batch_size < 1:
        raise RecpostError(f"--k and --batch_size must be >= 1 (got {k} and {batch_size})")
    recommender = load_pretrained(model)
    users = read_histories(Path(histories).expanduser(), timestamp_unit)
    started = time.perf_counter()
    recs = recommender.recommend(users, k=k, batch_size=batch_size, timestamp_unit="s")
    seconds = time.perf_counter() - started
    text = render_jsonl(recs) if format == "jsonl" else render_csv(recs)
    if out:
        write_text(Path(out).expanduser(), text)
    else:
        sys.stdout.write(text)
    report(recs, seconds, batch_size, listed_in_output=format == "jsonl")


def read_histories(path: Path, timestamp_unit: str = "auto") -> list[History]:
    """The histories in ``path`` (JSON lines, or a long CSV when the name ends in ``.csv``), timestamps in unix
    seconds by the data loader's rule (``timestamp_unit``: the unit of numeric ones, ``auto`` detects it)."""
    if not path.is_file():
        raise RecpostError(f"--histories: file not found: {path}")
    histories = read_csv_histories(path) if path.suffix.lower() == ".csv" else read_jsonl_histories(path)
    return in_seconds(histories, timestamp_unit, "--timestamp_unit", where=f"{path}: the timestamps")


def read_jsonl_histories(path: Path) -> list[History]:
    histories = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecpostError(f"{where}: not JSON ({exc.msg}); write one object per line, e.g. "
                               '{"user_id": "u1", "items": [50, 172]}') from None
        if not isinstance(row, dict) or "user_id" not in row or "items" not in row:
            raise RecpostError(f"{where}: each line needs 'user_id' and 'items', e.g. "
                               '{"user_id": "u1", "items": [50, 172]}')
        try:
            histories.append(as_history(row, number))
        except RecpostError as exc:
            raise RecpostError(f"{where}: {exc}") from None
    if not histories:
        raise RecpostError(f"{path} holds no histories")
    return histories


def read_csv_histories(path: Path) -> list[History]:
    """One history per ``user_id`` (in order of first appearance), its rows in file order."""
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={"user_id": pa.string(), "item_id": pa.string()}))
    except pa.ArrowInvalid as exc:
        raise RecpostError(f"cannot read {path} as CSV ({str(exc).splitlines()[0]}); it needs a header "
                           "user_id,item_id[,timestamp,rating]") from None
    missing = [c for c in ("user_id", "item_id") if c not in table.column_names]
    if missing:
        raise RecpostError(f"{path} has columns {table.column_names}, missing {missing}; the header must name "
                           "user_id,item_id[,timestamp,rating]")
    if table.num_rows == 0:
        raise RecpostError(f"{path} holds no histories")
    columns = {}
    for name in ("timestamp", "rating"):
        if name in table.column_names:
            column = table.column(name)
            if column.null_count:
                raise RecpostError(f"{path}: empty {name} in some rows; give one in every row or drop the column")
            if name == "timestamp":  # numbers, ISO dates or Arrow's own dates: in_seconds reads each
                columns[name] = column.to_pylist()
                continue
            try:
                columns[name] = column.cast(pa.float64()).to_pylist()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise RecpostError(f"{path}: the {name} column must hold numbers (found {column.type})") from None
    users, items = table.column("user_id").to_pylist(), table.column("item_id").to_pylist()
    by_user: dict[str, History] = {}
    for row, (user, item) in enumerate(zip(users, items)):
        if not user or not item:
            raise RecpostError(f"{path} row {row + 2}: empty {'user_id' if not user else 'item_id'}")
        history = by_user.setdefault(user, History(user, [], [] if "rating" in columns else None,
                                                   [] if "timestamp" in columns else None))
        history.items.append(item)
        if history.ratings is not None:
            history.ratings.append(columns["rating"][row])
        if history.timestamps is not None:
            history.timestamps.append(columns["timestamp"][row])
    return list(by_user.values())


def render_jsonl(recs: list[Recommendation]) -> str:
    return "".join(json.dumps({"user_id": r.user_id, "items": r.items, "scores": _rounded(r.scores),
                               "unknown_items": r.unknown_items}) + "\n" for r in recs)


def render_csv(recs: list[Recommendation]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["user_id", "rank", "item_id", "score"])
    for r in recs:
        writer.writerows([r.user_id, rank, item, score] for rank, (item, score) in enumerate(zip(r.items, _rounded(r.scores)), 1))
    return buffer.getvalue()


def _rounded(scores: list[float]) -> list[float]:
    return [float(f"{s:.{SCORE_DIGITS}g}") for s in scores]


def report(recs: list[Recommendation], seconds: float, batch_size: int, listed_in_output: bool) -> None:
    """Throughput, and the users whose histories held unknown items (or no known item), on stderr."""
    print(f"recommended for {_users(len(recs))} in {seconds:.3f} s: {len(recs) / max(seconds, 1e-9):,.0f} users/s "
          f"(batches of {batch_size})", file=sys.stderr)
    with_unknown = [r for r in recs if r.unknown_items]
    if with_unknown and listed_in_output:
        print(f"{_users(len(with_unknown))} had items the model does not know (left out of their history; see "
              "unknown_items)", file=sys.stderr)
    elif with_unknown:
        for r in with_unknown[:REPORTED_USERS]:
            print(f"user {r.user_id}: unknown items left out of the history: {', '.join(map(str, r.unknown_items))}",
                  file=sys.stderr)
        if len(with_unknown) > REPORTED_USERS:
            print(f"... and {_users(len(with_unknown) - REPORTED_USERS)} more with unknown items (--format jsonl lists "
                  "them all)", file=sys.stderr)
    empty = sum(1 for r in recs if not r.items)
    if empty:
        print(f"{_users(empty)} had no item the model knows: no recommendations for them", file=sys.stderr)


def _users(n: int) -> str:
    return f"{n:,} user" if n == 1 else f"{n:,} users"
