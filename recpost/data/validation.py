"""Validation of the canonical interactions table: one clear error for the first bad value.

Every source's raw table passes through :func:`validate_interactions` before preprocessing, so a bad
file gets a message naming the column, the row and the fix, not a parser or kernel error later.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from recpost.core.errors import RecpostError
from recpost.core.timestamps import unix_seconds

CANONICAL_COLUMNS = ("user_id", "item_id", "timestamp", "rating")


def validate_interactions(table: pa.Table, where: str, rating_range: tuple[float, float],
                          timestamp_unit: str = "auto") -> pa.Table:
    """Check and cast the canonical table; raise one ``RecpostError`` for the first problem found.

    Returns a table with ``user_id``/``item_id`` as strings, ``timestamp`` int64 unix seconds
    (:func:`recpost.core.timestamps.unix_seconds`: ``timestamp_unit`` declares a numeric unit, ``auto``
    detects it), ``rating`` float64.
    """

    def first_row(mask: pa.ChunkedArray | pa.Array) -> int:
        return int(pc.index(mask, True).as_py()) + 1

    if table.num_rows == 0:
        raise RecpostError(f"{where} holds no interactions")
    out = {}
    for col in ("user_id", "item_id"):
        values = table.column(col).cast(pa.string())
        missing = pc.or_kleene(pc.is_null(values), pc.equal(values, ""))  # CSV readers keep empty ids as ""
        if pc.any(missing).as_py():
            raise RecpostError(f"{where}: missing {col} in row {first_row(missing)}; every row needs one")
        out[col] = values

    rating = table.column("rating")
    if not pa.types.is_floating(rating.type) and not pa.types.is_integer(rating.type):
        as_float = _try_float(rating)
        if as_float is None:
            raise RecpostError(
                f"{where}: the rating column is not numeric (type {rating.type}, e.g. {_first_non_numeric(rating)!r}); "
                "ratings must be numbers"
            )
        rating = as_float
    rating = rating.cast(pa.float64())
    invalid = pc.or_kleene(pc.is_null(rating), pc.is_nan(rating))  # Kleene: a null row counts as invalid
    if pc.any(invalid).as_py():
        raise RecpostError(f"{where}: missing or NaN rating in row {first_row(invalid)}; drop or fill those rows")
    lo, hi = rating_range
    outside = pc.or_(pc.less(rating, lo), pc.greater(rating, hi))
    if pc.any(outside).as_py():
        row = first_row(outside)
        raise RecpostError(
            f"{where}: rating {rating[row - 1].as_py()} in row {row} is outside [{lo}, {hi}]; fix the data or "
            "set data.source.rating_range"
        )
    out["rating"] = rating

    ts = table.column("timestamp")
    if ts.null_count:
        raise RecpostError(f"{where}: missing timestamp in row {first_row(pc.is_null(ts))}; every row needs one")
    ts = unix_seconds(ts, where, timestamp_unit)  # one unit for time: integer seconds, whatever the input form
    negative = pc.less(ts, 0)
    if pc.any(negative).as_py():
        row = first_row(negative)
        raise RecpostError(f"{where}: negative timestamp {ts[row - 1].as_py()} in row {row} (before 1970 once in "
                           "seconds); timestamps must be >= 0")
    out["timestamp"] = ts
    return pa.table({c: out[c] for c in CANONICAL_COLUMNS})


def _try_float(values: pa.ChunkedArray) -> pa.ChunkedArray | None:
    try:
        return pc.cast(values, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _first_non_numeric(values: pa.ChunkedArray) -> str:
    strings = values.cast(pa.string())
    for chunk in strings.chunks:  # only reached on the error path; stops at the first bad value
        for v in chunk.to_pylist():
            try:
                float(v)
            except (TypeError, ValueError):
                return v
    return "?"


def check_options(
    *, max_len: int, batch_size: int, eval_batch_size: int, min_interactions: int, duplicates: str,
    reward_transform: str, length_grouping: int, train_users: str, eval_min_rating: float | None,
    rating_range: tuple[float, float], train_samples: str = "windows",
) -> None:
    """The ``RecDataModule``'s options (``data.*``): one ``RecpostError`` line for the first bad one."""
    if max_len < 2:
        raise RecpostError(f"data.max_len must be >= 2 (got {max_len}): a model needs at least one past item and one target")
    if batch_size < 1 or eval_batch_size < 1:
        raise RecpostError("data.batch_size and data.eval_batch_size must be >= 1")
    if min_interactions < 0:
        raise RecpostError(f"data.min_interactions must be >= 0 (got {min_interactions})")
    if duplicates not in ("drop", "error"):
        raise RecpostError(f"data.duplicates must be 'drop' or 'error' (got {duplicates!r})")
    if reward_transform not in ("identity", "centered", "minmax"):
        raise RecpostError(f"data.reward_transform must be 'identity', 'centered' or 'minmax' (got {reward_transform!r})")
    if train_samples not in ("windows", "prefixes"):
        raise RecpostError(f"data.train_samples must be 'windows' or 'prefixes', got {train_samples!r}")
    if length_grouping < 0:
        raise RecpostError(f"data.length_grouping must be >= 0 batches per pool (got {length_grouping}); 0 turns it off")
    if train_users not in ("all", "bootstrap"):
        raise RecpostError(f"data.train_users must be 'all' or 'bootstrap' (got {train_users!r})")
    lo, hi = rating_range
    number = isinstance(eval_min_rating, (int, float)) and not isinstance(eval_min_rating, bool)
    if eval_min_rating is not None and not (number and eval_min_rating <= hi):  # NaN fails too
        raise RecpostError(
            f"data.eval_min_rating must be a rating on the source's scale, at most {hi:g} (got {eval_min_rating!r}): no "
            f"held-out target is rated above {hi:g}; the paper uses 4.5 on {lo:g}..{hi:g} stars, null evaluates every user"
        )
