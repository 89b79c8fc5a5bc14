"""Raw data sources: each reads its files into the canonical interactions table.

Canonical table (pyarrow): ``user_id`` (string), ``item_id`` (string), ``timestamp`` (after validation:
int64 unix seconds, or any non-negative order key; ``recpost.core.timestamps``), ``rating`` (float64). All
parsing is done by Arrow's vectorised readers; no Python loop touches individual rows.

A source also reports a ``fingerprint`` (options plus file size and mtime) that keys the on-disk
cache, so editing a file or an option rebuilds the cache. Every option of a source either changes the
fingerprint or the cache entry's name, or cannot change what is read (``tests/test_cache_integrity.py``
holds each source to that).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from recpost.data.validation import CANONICAL_COLUMNS
from recpost.core.errors import RecpostError

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"


def default_data_root() -> Path:
    """``$RECPOST_DATA_DIR`` if set, else ``~/.cache/recpost/data``."""
    env = os.environ.get("RECPOST_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "recpost" / "data"


def _resolve_root(root: str | None) -> Path:
    """A source's data folder: null is the data dir; ``$RECPOST_DATA_DIR/<folder>`` is that folder inside it
    (how a shipped config names data without a path that holds only in one checkout); else the path."""
    head, _, folder = str(root or "").partition("/")
    if head in ("$RECPOST_DATA_DIR", "${RECPOST_DATA_DIR}"):
        return default_data_root() / folder
    return Path(root).expanduser() if root else default_data_root()


def data_dir_hint() -> str:
    """Where the data dir is and why, for a not-found message."""
    env = os.environ.get("RECPOST_DATA_DIR")
    return f"RECPOST_DATA_DIR={env}" if env else f"RECPOST_DATA_DIR is not set, so the data dir is {default_data_root()}"


def _file_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Source(ABC):
    """Where interactions come from. Subclasses read files; the DataModule does the rest."""

    #: Valid rating interval (inclusive); values outside it are rejected as bad input.
    rating_range: tuple[float, float] = (1.0, 5.0)
    #: The unit of numeric timestamps (``s``, ``ms``, ``us``, ``ns``), or ``auto``: detected from their size.
    timestamp_unit: str = "auto"

    @property
    @abstractmethod
    def name(self) -> str:
        """Short name used for the cache folder (e.g. ``ml-100k``)."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """Everything that changes the table: options and the stamp of the files read."""

    @abstractmethod
    def load(self) -> pa.Table:
        """Read the raw table with the canonical column names (types are validated later)."""


def _read_delimited(
    data: pa.NativeFile | str | Path,
    *,
    where: str,
    column_names: list[str] | None,
    delimiter: str,
    usecols: dict[str, str],
    header: bool,
) -> pa.Table:
    """Read a delimited text file; ``usecols`` maps the file's column names to canonical ones.

    User and item ids are read as strings: Arrow's inference would turn all-digit ids into integers
    and lose leading zeros (Amazon ASINs such as ``0000013714``). Rating and timestamp types are
    left to inference and checked by ``validate_interactions`` so that a bad value gets a message
    naming the column and row rather than a parser error.
    """
    read_opts = pacsv.ReadOptions(column_names=column_names, autogenerate_column_names=False)
    if header:
        read_opts = pacsv.ReadOptions()
    parse_opts = pacsv.ParseOptions(delimiter=delimiter)
    id_types = {col: pa.string() for col, canon in usecols.items() if canon in ("user_id", "item_id")}
    convert_opts = pacsv.ConvertOptions(column_types=id_types)
    try:
        table = pacsv.read_csv(data, read_options=read_opts, parse_options=parse_opts, convert_options=convert_opts)
    except pa.ArrowInvalid as exc:
        msg = str(exc).splitlines()[0]
        raise RecpostError(
            f"cannot parse {where} as {delimiter!r}-separated values ({msg}); check the delimiter "
            f"and that every row has the columns {list(usecols)}"
        ) from None
    missing = [c for c in usecols if c not in table.column_names]
    if missing:
        raise RecpostError(
            f"{where} has columns {table.column_names}, missing {missing}; check the delimiter "
            f"({delimiter!r}) and the column names"
        )
    return table.select(list(usecols)).rename_columns([usecols[c] for c in usecols])


class MovieLens(Source):
    """MovieLens from GroupLens, read from the official archive layout.

    Looks for ``<root>/ml-100k/u.data`` (or ``<root>/ml-100k.zip``), ``<root>/ml-1m/ratings.dat``,
    ``<root>/ml-20m/ratings.csv`` (also ``25m``, ``32m``, and the ever-growing ``latest`` and
    ``latest-small``: ``ml-latest/ratings.csv``, ``ml-latest-small/ratings.csv``). The csv releases
    rate in half stars, 0.5..5. When neither the folder nor the zip is there and ``download`` is true,
    fetches the zip from GroupLens into ``root``; otherwise fails with the path it expected.

    Args:
        variant: which MovieLens release.
        root: data folder; default ``$RECPOST_DATA_DIR`` or ``~/.cache/recpost/data``.
        download: fetch the official zip from GroupLens when it is missing.
    """

    timestamp_unit = "s"  # every release: unix seconds
    _LAYOUT = {
        "100k": ("ml-100k", "u.data", "\t", False, (1.0, 5.0)),
        "1m": ("ml-1m", "ratings.dat", "::", False, (1.0, 5.0)),
        "20m": ("ml-20m", "ratings.csv", ",", True, (0.5, 5.0)),
        "25m": ("ml-25m", "ratings.csv", ",", True, (0.5, 5.0)),
        "32m": ("ml-32m", "ratings.csv", ",", True, (0.5, 5.0)),
        "latest": ("ml-latest", "ratings.csv", ",", True, (0.5, 5.0)),
        "latest-small": ("ml-latest-small", "ratings.csv", ",", True, (0.5, 5.0)),
    }

    def __init__(
        self,
        variant: Literal["100k", "1m", "20m", "25m", "32m", "latest", "latest-small"] = "100k",
        root: str | None = None,
        download: bool = True,
    ) -> None:
        if variant not in self._LAYOUT:
            raise RecpostError(f"unknown MovieLens variant {variant!r}; use one of {list(self._LAYOUT)}")
        self.variant = variant
        self.root = _resolve_root(root)
        self.download = download
        self.folder, self.filename, self.delimiter, self.header, self.rating_range = self._LAYOUT[variant]

    @property
    def name(self) -> str:
        return self.folder

    @property
    def path(self) -> Path:
        """The ratings file (or the zip holding it) that ``load`` reads; named in error messages."""
        return self._locate()

    def _locate(self) -> Path:
        """The extracted ratings file, or the zip holding it."""
        extracted = self.root / self.folder / self.filename
        archive = self.root / f"{self.folder}.zip"
        if extracted.is_file():
            return extracted
        if archive.is_file():
            return archive
        if self.download:
            return self._download(archive, extracted)
        raise RecpostError(
            f"MovieLens {self.variant} not found: expected {extracted} or {archive}; download "
            f"{GROUPLENS_URL.format(name=self.folder)} into {self.root}, or set RECPOST_DATA_DIR or "
            f"--data.source.init_args.root to where it is ({data_dir_hint()})"
        )

    def _download(self, archive: Path, extracted: Path) -> Path:
        url = GROUPLENS_URL.format(name=self.folder)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=30) as resp, tempfile.NamedTemporaryFile(
                dir=self.root, delete=False, suffix=".part"
            ) as tmp:
                shutil.copyfileobj(resp, tmp)
            os.replace(tmp.name, archive)  # atomic: a broken download never looks complete
        except OSError as exc:
            raise RecpostError(
                f"MovieLens {self.variant} not found at {extracted} or {archive}, and downloading {url} "
                f"failed ({exc}); download it by hand into {self.root}"
            ) from None
        return archive

    def fingerprint(self) -> dict:
        return {"source": "movielens", "variant": self.variant, "file": _file_stamp(self._locate())}

    def load(self) -> pa.Table:
        path = self._locate()
        where = str(path)
        if path.suffix == ".zip":
            member = f"{self.folder}/{self.filename}"
            with zipfile.ZipFile(path) as zf:
                if member not in zf.namelist():
                    raise RecpostError(f"{path} has no {member}; is it the official GroupLens archive?")
                raw = zf.read(member)
            where = f"{path}:{member}"
        else:
            raw = path.read_bytes()
        delimiter = self.delimiter
        if delimiter == "::":  # Arrow takes one-byte delimiters; ratings.dat holds no other ':'
            raw = raw.replace(b"::", b"\t")
            delimiter = "\t"
        if self.header:
            usecols = {"userId": "user_id", "movieId": "item_id", "timestamp": "timestamp", "rating": "rating"}
            names = None
        else:
            names = ["user_id", "item_id", "rating", "timestamp"]
            usecols = {c: c for c in ("user_id", "item_id", "timestamp", "rating")}
        return _read_delimited(
            pa.BufferReader(raw), where=where, column_names=names, delimiter=delimiter, usecols=usecols,
            header=self.header,
        )


class Amazon(Source):
    """Amazon product reviews (McAuley et al.): the ratings-only CSVs or the review dumps, 2014 or 2018.

    Unless ``path`` names the file, it is looked up under ``<root>/amazon/`` by its official name:

    ============  ==========================================  =================================
    ``file``      ``release: 2014``                            ``release: 2018``
    ============  ==========================================  =================================
    ratings       ``ratings_<category>.csv``                   ``<category>.csv``
    reviews       ``reviews_<category>.json.gz``               ``<category>.json.gz``
    reviews_5core ``reviews_<category>_5.json.gz``             ``<category>_5.json.gz``
    ============  ==========================================  =================================

    The ratings-only CSVs have no header: ``user,item,rating,timestamp`` in 2014, ``item,user,rating,
    timestamp`` in 2018. The review dumps are JSON lines (gzip, or plain once unpacked: a ``.json``
    without ``.gz`` is found too) of which ``reviewerID``, ``asin``, ``overall`` and ``unixReviewTime``
    are read and every other field (texts, votes, images, styles) is skipped by the parser. The 5-core
    dumps are already 5-core; for the others the DataModule's ``min_interactions: 5`` does it.

    Args:
        category: the product category as in the file names (``Books``, ``Movies_and_TV``, ...).
        file: ``ratings`` (ratings-only CSV), ``reviews`` (every review) or ``reviews_5core``.
        release: the dataset's release, which fixes the file names and the CSV column order.
        path: the file itself (``.csv`` is read as ratings, anything else as review JSON lines).
        root: data folder; default ``$RECPOST_DATA_DIR`` or ``~/.cache/recpost/data``.
    """

    rating_range = (1.0, 5.0)
    timestamp_unit = "s"  # unixReviewTime and the CSVs' fourth column: unix seconds
    _FILES = {
        2014: {"ratings": "ratings_{}.csv", "reviews": "reviews_{}.json.gz", "reviews_5core": "reviews_{}_5.json.gz"},
        2018: {"ratings": "{}.csv", "reviews": "{}.json.gz", "reviews_5core": "{}_5.json.gz"},
    }
    _CSV_COLUMNS = {2014: ["user_id", "item_id", "rating", "timestamp"], 2018: ["item_id", "user_id", "rating", "timestamp"]}
    _REVIEW_FIELDS = {"reviewerID": "user_id", "asin": "item_id", "unixReviewTime": "timestamp", "overall": "rating"}
    _REVIEW_TYPES = {"user_id": pa.string(), "item_id": pa.string(), "timestamp": pa.int64(), "rating": pa.float64()}

    def __init__(
        self,
        category: str = "Books",
        file: Literal["ratings", "reviews", "reviews_5core"] = "ratings",
        release: Literal[2014, 2018] = 2014,
        path: str | None = None,
        root: str | None = None,
    ) -> None:
        if release not in self._FILES or file not in self._FILES[release]:
            raise RecpostError(f"Amazon: unknown release {release!r} or file {file!r}; use release 2014 or 2018 and "
                               "file ratings, reviews or reviews_5core")
        self.category, self.file, self.release = category, file, release
        self.path = Path(path).expanduser() if path else _resolve_root(root) / "amazon" / self._FILES[release][file].format(category)

    @property
    def name(self) -> str:
        return f"amazon-{self.category.lower()}"

    def _check(self) -> Path:
        candidates = [self.path]
        if self.path.suffix == ".gz":
            candidates.append(self.path.with_suffix(""))  # unpacked with gunzip
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        what = "ratings file" if self.file == "ratings" else "review dump"
        raise RecpostError(
            f"Amazon {what} not found: {' or '.join(map(str, candidates))}; download it from the Amazon review data "
            f"({self.release} release) and set data.source.root, or data.source.path to the file ({data_dir_hint()})"
        )

    def fingerprint(self) -> dict:
        return {"source": "amazon", "release": self.release, "file": _file_stamp(self._check())}

    def load(self) -> pa.Table:
        path = self._check()
        if path.name.lower().endswith((".csv", ".csv.gz")):
            return _read_delimited(
                path, where=str(path), column_names=self._CSV_COLUMNS[self.release], delimiter=",",
                usecols={c: c for c in CANONICAL_COLUMNS}, header=False,
            )
        schema = pa.schema([(field, self._REVIEW_TYPES[canon]) for field, canon in self._REVIEW_FIELDS.items()])
        options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        try:
            table = pajson.read_json(path, parse_options=options)
        except (pa.ArrowInvalid, OSError) as exc:
            raise RecpostError(
                f"cannot read {path} as JSON lines ({str(exc).splitlines()[0]}); the Amazon review dumps hold one "
                f"JSON object per line with {', '.join(self._REVIEW_FIELDS)}"
            ) from None
        return table.rename_columns([self._REVIEW_FIELDS[c] for c in table.column_names])
