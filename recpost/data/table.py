"""The ``table`` source: any CSV, Parquet or JSON-lines file of interactions, with a column mapping.

Every option is described in docs/guide/data-formats.md; this class reads the file into the canonical
table (``recpost.data.sources``) and leaves checks and the unit of time to validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from recpost.core.errors import RecpostError
from recpost.data.sources import Source, _file_stamp, _read_delimited
from recpost.data.validation import CANONICAL_COLUMNS


class Table(Source):
    """Any CSV, Parquet or JSON-lines table, with a column mapping (every option: docs/guide/data-formats.md).

    Args:
        path: the file; a ``.gz`` ending (``ratings.csv.gz``, ``log.jsonl.gz``) is read through gzip.
        format: ``auto`` picks from the extension before any ``.gz``: ``.csv``/``.tsv``/``.txt`` -> csv,
            ``.parquet``/``.pq`` -> parquet, ``.jsonl``/``.json`` -> jsonl (one JSON object per line).
        user_col, item_col, rating_col, timestamp_col: the file's column names.
        delimiter: for CSV; default a tab for ``.tsv`` files, else a comma.
        header: whether the CSV has a header row; without one, columns are named
            ``user_id, item_id, rating, timestamp`` in that order.
        rating_range: valid ratings (inclusive); anything outside is rejected.
        timestamp_unit: the unit of numeric timestamps (``s``, ``ms``, ``us``, ``ns``); ``auto`` detects it from
            their size and refuses a column that fits no one unit. ISO dates and date-times need none. Every
            timestamp is kept as integer unix seconds.
        name: cache folder name.
    """

    _FORMATS = {"csv": (".csv", ".tsv", ".txt"), "parquet": (".parquet", ".pq"), "jsonl": (".jsonl", ".json")}

    def __init__(
        self,
        path: str,
        format: Literal["auto", "csv", "parquet", "jsonl"] = "auto",
        user_col: str = "user_id",
        item_col: str = "item_id",
        rating_col: str = "rating",
        timestamp_col: str = "timestamp",
        delimiter: str | None = None,
        header: bool = True,
        rating_range: tuple[float, float] = (1.0, 5.0),
        timestamp_unit: Literal["auto", "s", "ms", "us", "ns"] = "auto",
        name: str = "table",
    ) -> None:
        self.path = Path(path).expanduser()
        self.format = format
        self.columns = {user_col: "user_id", item_col: "item_id", timestamp_col: "timestamp", rating_col: "rating"}
        self.delimiter = delimiter if delimiter is not None else "\t" if self._extension() == ".tsv" else ","
        self.header = header
        self.rating_range = (float(rating_range[0]), float(rating_range[1]))
        if timestamp_unit not in ("auto", "s", "ms", "us", "ns"):
            raise RecpostError(f"data.source.timestamp_unit must be auto, s, ms, us or ns (got {timestamp_unit!r})")
        self.timestamp_unit = timestamp_unit
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def _extension(self) -> str:
        """The extension that tells the format: ``.csv`` for ``ratings.csv`` and ``ratings.csv.gz`` alike."""
        suffixes = [s.lower() for s in self.path.suffixes]
        if suffixes and suffixes[-1] == ".gz":
            suffixes.pop()
        return suffixes[-1] if suffixes else ""

    def _resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        ext = self._extension()
        for fmt, exts in self._FORMATS.items():
            if ext in exts:
                return fmt
        known = ", ".join(e for exts in self._FORMATS.values() for e in exts)
        raise RecpostError(f"cannot tell the format of {self.path} from its extension ({known}, each optionally "
                           "followed by .gz); set data.source.format")

    def _check(self) -> Path:
        if not self.path.is_file():
            raise RecpostError(f"interactions file not found: {self.path}; set data.source.path")
        return self.path

    def fingerprint(self) -> dict:
        return {
            "source": "table", "format": self._resolved_format(), "columns": self.columns,
            "delimiter": self.delimiter, "header": self.header, "rating_range": list(self.rating_range),
            "timestamp_unit": self.timestamp_unit, "file": _file_stamp(self._check()),
        }

    def load(self) -> pa.Table:
        path = self._check()
        fmt = self._resolved_format()
        # gzip from the name whatever its case (Arrow's own detection knows ".gz" only)
        data = pa.input_stream(str(path), compression="gzip") if path.suffix.lower() == ".gz" else path
        if fmt == "csv":
            names = None if self.header else ["user_id", "item_id", "rating", "timestamp"]
            usecols = self.columns if self.header else {c: c for c in CANONICAL_COLUMNS}
            return _read_delimited(
                data, where=str(path), column_names=names, delimiter=self.delimiter, usecols=usecols, header=self.header
            )
        try:
            table = pq.read_table(path) if fmt == "parquet" else pajson.read_json(data)
        except (pa.ArrowInvalid, OSError) as exc:
            raise RecpostError(f"cannot read {path} as {fmt} ({str(exc).splitlines()[0]})") from None
        missing = [c for c in self.columns if c not in table.column_names]
        if missing:
            raise RecpostError(
                f"{path} has columns {table.column_names}, missing {missing}; set data.source.user_col / "
                "item_col / rating_col / timestamp_col"
            )
        return table.select(list(self.columns)).rename_columns(list(self.columns.values()))
