"""One unit for time: every timestamp recpost keeps is an integer count of seconds since 1970 (UTC).

Input comes in many forms: unix seconds, milliseconds, microseconds or nanoseconds; ISO dates and
date-times, with or without a fraction of a second or a zone; Arrow's own timestamp and date columns
(Parquet, or a CSV column Arrow recognised). :func:`unix_seconds` turns all of them into seconds, so
that a data file and a ``recommend`` history given in two forms still mean the same instant (HSTU's time
bias reads the differences). A numeric unit is declared (``s``, ``ms``, ``us``, ``ns``) or, with
``auto``, detected from the largest value; values that fit no one unit are refused with one line that
says how to declare it. Fractions of a second are dropped (floor); a zone-less date-time is read as UTC.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recpost.core.errors import RecpostError

TimestampUnit = Literal["auto", "s", "ms", "us", "ns"]
PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
# ``auto``: the largest value decides. Seconds stay below 1e11 (the year 5138; small order keys are
# seconds too); milliseconds of 1973-5138 lie in [1e11, 1e14), microseconds in [1e14, 1e17),
# nanoseconds above.
AUTO_BOUNDS = ((1e11, "s"), (1e14, "ms"), (1e17, "us"), (float("inf"), "ns"))
# ``auto`` with ms/us/ns: a non-zero value before this many seconds (1973-03) beside the largest one means
# the column mixes units (or holds a large order key): refused rather than guessed.
EARLIEST_DETECTED = 1e8
ISO_EXAMPLE = "2024-05-01, 2024-05-01T12:30:00 or 2024-05-01T12:30:00.250+02:00"


def unix_seconds(values: pa.Array | pa.ChunkedArray, where: str, unit: str = "auto",
                 declare: str = "data.source.timestamp_unit") -> pa.Array:
    """``values`` (no nulls) as int64 seconds since 1970; one ``RecpostError`` line when they cannot be.

    ``where`` names the data in messages; ``declare`` is the option that sets ``unit`` (named in them).
    """
    if unit not in ("auto", *PER_SECOND):
        raise RecpostError(f"{declare} must be auto, s, ms, us or ns (got {unit!r})")
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        numbers = _as_numbers(values)
        if numbers is None:
            return _from_timestamps(_parse_iso(values, where, unit, declare))
        values, kind = numbers, numbers.type
    if pa.types.is_timestamp(kind):
        return _from_timestamps(values)
    if pa.types.is_date(kind):
        return _from_timestamps(values.cast(pa.timestamp("s")))
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return _from_numbers(values, where, unit, declare)
    raise RecpostError(f"{where}: timestamps of type {kind} are not times; give unix seconds (or ms, us, ns) or ISO "
                       f"dates such as {ISO_EXAMPLE}")


def _as_numbers(values: pa.Array) -> pa.Array | None:
    """Strings that all spell numbers (JSON or a CSV read as text), as numbers; else None."""
    for kind in (pa.int64(), pa.float64()):
        try:
            return values.cast(kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return None


def _parse_iso(values: pa.Array, where: str, unit: str, declare: str) -> pa.Array:
    """ISO 8601 dates and date-times (each with or without fraction or zone) as UTC timestamps."""
    import pandas as pd  # pandas' ISO parser takes every ISO form in one column; Arrow's cast takes one form

    if unit != "auto":
        raise RecpostError(f"{where}: the timestamps are ISO dates, not numbers in {unit}; set {declare}: auto "
                           "(ISO dates need no unit)")
    series = pd.Series(values.to_pylist(), dtype=object)
    parsed = pd.to_datetime(series, format="ISO8601", utc=True, errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        row = int(bad[0])
        raise RecpostError(f"{where}: timestamp {series[row]!r} in row {row + 1} is neither a number nor an ISO date "
                           f"or date-time (e.g. {ISO_EXAMPLE}); fix that row")
    return pa.array(parsed)


def _from_timestamps(values: pa.Array) -> pa.Array:
    """An Arrow timestamp column (any unit; a zone is already UTC inside) as whole seconds (floor)."""
    kind = values.type
    raw = values.cast(pa.timestamp(kind.unit)).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return pa.array(np.floor_divide(raw, PER_SECOND[kind.unit]), pa.int64())


def _from_numbers(values: pa.Array, where: str, unit: str, declare: str) -> pa.Array:
    raw = values.to_numpy(zero_copy_only=False)
    if len(raw) == 0:
        return pa.array([], pa.int64())
    if pa.types.is_floating(values.type) and not np.isfinite(raw).all():
        row = int(np.flatnonzero(~np.isfinite(raw))[0]) + 1
        raise RecpostError(f"{where}: timestamp {raw[row - 1]} in row {row} is not a number; fix that row")
    if unit == "auto":
        unit = detect_unit(raw, where, declare)
    factor = PER_SECOND[unit]
    if pa.types.is_integer(values.type):
        seconds = np.floor_divide(raw.astype(np.int64), factor)
    else:
        seconds = np.floor(raw / factor).astype(np.int64)
    return pa.array(seconds, pa.int64())


def detect_unit(raw: np.ndarray, where: str, declare: str) -> str:
    """The unit of unix times ``raw`` from their largest value (:data:`AUTO_BOUNDS`); refused when the
    smallest non-zero value would fall before 1973 in that unit (mixed units, or an order key that large)."""
    high = float(np.max(raw))
    unit = next(name for bound, name in AUTO_BOUNDS if high < bound)
    if unit == "s":
        return unit
    nonzero = raw[raw > 0]
    low = float(np.min(nonzero)) if len(nonzero) else high
    if low / PER_SECOND[unit] < EARLIEST_DETECTED:
        raise RecpostError(
            f"{where}: the timestamps run from {low:.0f} to {high:.0f}, which fits no single unit (the largest "
            f"reads as {unit}, the smallest then as before 1973); set {declare} to s, ms, us or ns (s keeps order "
            "keys as they are)")
    return unit
