"""Synthetic ratings at any shape, written in an official layout, for benchmarks only (never for results).

The costs of preprocessing, training and evaluation depend on the data's shape (users, items,
interactions, how long the sequences are, how skewed popularity is), not on what the ratings mean. This
module draws a data set of a given shape and writes it where the real loaders look for the real one,
so a benchmark exercises the real code path end to end:

- ``ml20m``: ``<root>/ml-20m/ratings.csv`` (header ``userId,movieId,rating,timestamp``, half stars,
  sorted by user then movie as GroupLens ships it): ``MovieLens("20m", root=<root>)``;
- ``amazon_csv``: ``<root>/amazon/ratings_<Category>.csv`` (the 2014 ratings-only CSV: no header,
  ``user,item,rating,timestamp``, whole stars as ``5.0``): ``Amazon(category, root=<root>)``;
- ``amazon_json``: ``<root>/amazon/reviews_<Category>_5.json`` (the 2014 5-core review dump, unpacked:
  one JSON object per line with ``reviewerID``, ``asin``, ``overall``, ``unixReviewTime`` and the text
  fields the loader skips): ``Amazon(category, file="reviews_5core", root=<root>)``.

A ``SYNTHETIC.json`` beside the file records the shape and seed, so nobody mistakes it for the real data.

How a shape is drawn (numpy, vectorised, seeded; no loop over rows or users):

- interactions per user: a log-normal spread, at least ``min_per_user`` and at most a third of the
  catalog, summing exactly to ``n_interactions``;
- items: every item ``min_per_item`` times (so the catalog has exactly ``n_items`` items and a k-core
  filter with ``k <= min_per_item`` keeps everything), the rest drawn from a power law over a random
  order of the items, ``p(rank r) ~ (r + offset)^-exponent``;
- no user has an item twice: a repeated (user, item) draw is redrawn (from the power law, then uniformly
  for the few heavy users a skewed draw keeps colliding), only the users with a repeat re-checked each
  round; a repeated slot that holds one of an item's guaranteed copies swaps its item with another slot;
- ratings from the shape's star distribution (whole or half stars), timestamps increasing per user;
- ids as the real files spell them (MovieLens: integers with gaps; Amazon: ``A...`` reviewer ids and
  ISBN-like or ``B00...`` ASINs), written a chunk of rows at a time by Arrow's CSV writer.

    python -m recpost.bench.synthetic --shape books --root /tmp/scale     # or: ml20m, or --users ... for any shape
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recpost.core.errors import RecpostError

Layout = Literal["ml20m", "amazon_csv", "amazon_json"]
CHUNK_ROWS = 1 << 20  # rows per write: the file is produced a chunk at a time
MAX_ROUNDS = 200  # rounds of redrawing repeated (user, item) pairs before giving up on a too dense shape
POPULARITY_ROUNDS = 4  # redraws from the power law; later rounds draw uniformly (heavy users need rare items)
HALF_STARS = tuple(np.arange(1, 11) / 2)  # 0.5 .. 5.0
WHOLE_STARS = (1.0, 2.0, 3.0, 4.0, 5.0)
ALPHABET36 = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)


@dataclass(frozen=True)
class Shape:
    """What a synthetic data set looks like; the presets copy public figures of the real sets."""

    n_users: int
    n_items: int
    n_interactions: int
    layout: Layout = "ml20m"
    category: str = "Books"  # the Amazon file names
    min_per_user: int = 5
    min_per_item: int = 1
    user_sigma: float = 1.0  # log-normal spread of interactions per user
    item_exponent: float = 1.0  # power-law popularity: p(rank r) ~ (r + item_offset)^-item_exponent
    item_offset: float = 10.0
    rating_probs: tuple[float, ...] = (0.04, 0.05, 0.12, 0.25, 0.54)  # over the stars of the scale, low to high
    half_stars: bool = False
    first_timestamp: int = 820_454_400  # 1996-01-01
    last_timestamp: int = 1_406_073_600  # 2014-07-23

    @property
    def stars(self) -> tuple[float, ...]:
        return HALF_STARS if self.half_stars else WHOLE_STARS

    def check(self) -> None:
        """One line on the first impossible number, before anything is drawn."""
        cap = self.max_per_user
        if min(self.n_users, self.n_items, self.min_per_user, self.min_per_item) < 1:
            raise RecpostError(f"synthetic shape {self}: users, items, min_per_user and min_per_item must be >= 1")
        if len(self.rating_probs) != len(self.stars) or not np.isclose(sum(self.rating_probs), 1.0):
            raise RecpostError(f"synthetic shape: rating_probs needs {len(self.stars)} probabilities summing to 1 "
                               f"(one per star of the {'half' if self.half_stars else 'whole'}-star scale)")
        if not self.n_users * self.min_per_user <= self.n_interactions <= self.n_users * cap:
            raise RecpostError(
                f"synthetic shape: {self.n_interactions:,} interactions do not fit {self.n_users:,} users with "
                f"{self.min_per_user}..{cap} each (at most a third of the {self.n_items:,} items); change the counts")
        if self.n_items * self.min_per_item > self.n_interactions:
            raise RecpostError(f"synthetic shape: {self.n_items:,} items x {self.min_per_item} copies exceed the "
                               f"{self.n_interactions:,} interactions; lower min_per_item or the item count")

    @property
    def max_per_user(self) -> int:
        return max(self.min_per_user, self.n_items // 3)


# Public figures of the real data sets; popularity and rating spreads are rough copies (costs depend on
# the counts and sequence lengths, not on these).
PRESETS: dict[str, Shape] = {
    # MovieLens-20M (GroupLens README): 20,000,263 ratings, 138,493 users (each >= 20), 26,744 rated movies,
    # half stars 0.5..5 (shares close to the real ones), 1995-01-09 .. 2015-03-31.
    "ml20m": Shape(n_users=138_493, n_items=26_744, n_interactions=20_000_263, layout="ml20m", min_per_user=20,
                   min_per_item=1, user_sigma=1.1, item_exponent=1.0, item_offset=60.0, half_stars=True,
                   rating_probs=(0.012, 0.034, 0.014, 0.072, 0.044, 0.214, 0.110, 0.278, 0.077, 0.145),
                   first_timestamp=789_652_009, last_timestamp=1_427_784_002),
    # Amazon Books, 2014 release, 5-core (McAuley et al.): 603,668 users, 367,982 items, 8,898,041 ratings;
    # already 5-core, so configs/pretrain/amazon_books.yaml's min_interactions: 5 keeps every row.
    "books": Shape(n_users=603_668, n_items=367_982, n_interactions=8_898_041, layout="amazon_csv", min_per_user=5,
                   min_per_item=5, user_sigma=0.9, item_exponent=0.9, item_offset=30.0,
                   rating_probs=(0.035, 0.045, 0.11, 0.26, 0.55)),
}


def preset(name: str, layout: Layout | None = None) -> Shape:
    if name not in PRESETS:
        raise RecpostError(f"no synthetic shape {name!r}; use one of {sorted(PRESETS)} or give the counts")
    shape = PRESETS[name]
    return dataclasses.replace(shape, layout=layout) if layout else shape


def data_file(shape: Shape, root: Path) -> Path:
    """Where the real loader looks for this layout under ``root`` (a data root, as ``RECPOST_DATA_DIR``)."""
    return root / {
        "ml20m": Path("ml-20m") / "ratings.csv",
        "amazon_csv": Path("amazon") / f"ratings_{shape.category}.csv",
        "amazon_json": Path("amazon") / f"reviews_{shape.category}_5.json",
    }[shape.layout]


# ----------------------------------------------------------------------------------- drawing
def user_counts(shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Interactions of each user ``[U]``: log-normal, within ``min_per_user..max_per_user``, summing exactly."""
    lo, hi, total = shape.min_per_user, shape.max_per_user, shape.n_interactions
    spread = rng.lognormal(0.0, shape.user_sigma, shape.n_users)
    counts = np.full(shape.n_users, lo, dtype=np.int64)
    for _ in range(64):  # the cap moves mass to the others; a few passes settle it
        left = total - counts.sum()
        if left == 0:
            break
        weight = np.where(counts < hi, spread, 0.0)
        ideal = left * weight / weight.sum()
        share = np.floor(ideal).astype(np.int64)
        share[np.argsort(share - ideal, kind="stable")[: left - share.sum()]] += 1  # largest remainders
        counts += np.minimum(share, hi - counts)
    if counts.sum() != total:
        raise RecpostError("synthetic shape: could not spread the interactions over the users; change the counts")
    return counts


def item_popularity(shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """``p [I]`` of each item: a power law over a random order of the items."""
    rank = rng.permutation(shape.n_items)
    weight = (rank + shape.item_offset) ** -shape.item_exponent
    return weight / weight.sum()


def draw_pairs(shape: Shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(user [N], item [N])``, user-major, every (user, item) pair once, 0-based ids; see the module doc."""
    shape.check()
    rng = np.random.default_rng(seed)
    counts = user_counts(shape, rng)
    user = np.repeat(np.arange(shape.n_users, dtype=np.int64), counts)
    n, n_items = len(user), shape.n_items
    p = item_popularity(shape, rng)
    guaranteed = rng.permutation(n)[: n_items * shape.min_per_item]  # slots holding each item's copies
    item = rng.choice(n_items, size=n, p=p)
    item[guaranteed] = np.repeat(np.arange(n_items), shape.min_per_item)
    kept = np.zeros(n, dtype=bool)
    kept[guaranteed] = True
    dirty = np.ones(shape.n_users, dtype=bool)  # users whose slots may hold a repeated item
    for round_ in range(MAX_ROUNDS):
        slots = np.flatnonzero(dirty[user])
        keys = user[slots] * n_items + item[slots]
        order = np.lexsort((~kept[slots], keys))  # within a repeated pair, a guaranteed copy first (kept)
        sorted_keys = keys[order]
        repeat = np.zeros(len(slots), dtype=bool)
        repeat[1:] = sorted_keys[1:] == sorted_keys[:-1]
        repeated = slots[order[repeat]]
        if len(repeated) == 0:
            return user, item
        dirty[:] = False
        dirty[user[repeated]] = True
        swap = repeated[kept[repeated]]  # a second guaranteed copy: trade places with any other slot
        if len(swap):
            partner = rng.integers(0, n, size=len(swap))
            item[swap], item[partner] = item[partner], item[swap].copy()
            kept[swap], kept[partner] = kept[partner], True
            dirty[user[partner]] = True
        redraw = repeated[~kept[repeated]]
        if round_ < POPULARITY_ROUNDS:
            item[redraw] = rng.choice(n_items, size=len(redraw), p=p)
        else:
            item[redraw] = rng.integers(0, n_items, size=len(redraw))
    raise RecpostError(f"synthetic shape: users still repeat items after {MAX_ROUNDS} rounds; the shape is too "
                       "dense (fewer interactions per user, or more items)")


def timestamps(shape: Shape, user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Increasing unix seconds within each user's rows (``user`` sorted), inside the shape's time span."""
    counts = np.bincount(user, minlength=shape.n_users)
    span = shape.last_timestamp - shape.first_timestamp
    active = (span * rng.uniform(0.02, 0.5, shape.n_users)).astype(np.int64)  # how long each user rates
    start = shape.first_timestamp + (rng.uniform(0, 1, shape.n_users) * (span - active)).astype(np.int64)
    within = _within_user_cumsum(rng.exponential(1.0, len(user)), counts)  # [N], increasing per user
    last = np.repeat(within[np.cumsum(counts) - 1], counts)
    return start[user] + (within / last * active[user]).astype(np.int64)


def _within_user_cumsum(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative sums of ``values`` restarting at each user's first row (``counts`` rows per user)."""
    total = np.cumsum(values)
    before = np.r_[0.0, total[np.cumsum(counts)[:-1] - 1]]  # the sum before each user's first row
    return total - np.repeat(before, counts)


def ratings(shape: Shape, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n]`` indices into ``shape.stars`` drawn from ``shape.rating_probs``."""
    return rng.choice(len(shape.stars), size=n, p=np.asarray(shape.rating_probs) / sum(shape.rating_probs))


# ----------------------------------------------------------------------------------- ids
def _encode(values: np.ndarray, width: int, base: int = 36) -> np.ndarray:
    """Non-negative integers as fixed-width ``[0-9A-Z]`` strings (bytes ``S<width>``), vectorised."""
    powers = base ** np.arange(width - 1, -1, -1, dtype=np.int64)
    digits = (values[:, None] // powers[None, :]) % base  # [n, width]
    return np.ascontiguousarray(ALPHABET36[digits]).view(f"S{width}").ravel()


def _strings(prefix: bytes, encoded: np.ndarray) -> pa.Array:
    return pa.array(np.char.add(prefix, encoded) if prefix else encoded, type=pa.binary()).cast(pa.string())


def _distinct(n: int, space: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct random integers in ``[0, space)``, in random order (one per stride of ``space // n``)."""
    stride = space // n
    return rng.permutation(n) * stride + rng.integers(0, stride, size=n)


def original_ids(shape: Shape, rng: np.random.Generator) -> tuple[pa.Array, pa.Array]:
    """The file's ids of users ``0..U-1`` and items ``0..I-1``, spelled as in the real files."""
    if shape.layout == "ml20m":  # userId 1..U; movieId integers with gaps (ML-20M's run to 131,262)
        movie = np.sort(_distinct(shape.n_items, max(131_262, 2 * shape.n_items), rng)) + 1
        return pa.array(np.arange(1, shape.n_users + 1)), pa.array(movie)
    reviewer = _strings(b"A", _encode(_distinct(shape.n_users, 36**12, rng), 13))  # e.g. A0X3K9...: 14 characters
    n_isbn = int(0.8 * shape.n_items)  # most book ASINs are ISBN-10s (digits); the rest B00 + 7 characters
    isbn = np.char.zfill(_distinct(n_isbn, 10**10, rng).astype("S10"), 10)
    kindle = np.char.add(b"B00", _encode(_distinct(shape.n_items - n_isbn, 36**7, rng), 7))
    asin = np.concatenate([isbn, kindle])[rng.permutation(shape.n_items)]
    return reviewer, pa.array(asin, type=pa.binary()).cast(pa.string())


# ----------------------------------------------------------------------------------- writing
def _csv_chunks(shape: Shape, user_ids: pa.Array, item_ids: pa.Array, user: np.ndarray, item: np.ndarray,
                stars: np.ndarray, ts: np.ndarray):
    labels = pa.array([f"{s:.1f}" for s in shape.stars])  # 4.0, 3.5: as the real files write them
    for start in range(0, len(user), CHUNK_ROWS):
        part = slice(start, start + CHUNK_ROWS)
        u, i = user_ids.take(pa.array(user[part])), item_ids.take(pa.array(item[part]))
        r, t = labels.take(pa.array(stars[part])), pa.array(ts[part])
        yield u, i, r, t


def write_csv(path: Path, shape: Shape, columns) -> None:
    """The rows as CSV, a chunk at a time; ML-20M's header unquoted, as GroupLens writes it."""
    names = ["userId", "movieId", "rating", "timestamp"]
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with pa.OSFile(str(path), "wb") as sink:
        if shape.layout == "ml20m":
            sink.write(",".join(names).encode() + b"\n")
        writer = None
        for u, i, r, t in columns:
            table = pa.table([u, i, r, t], names=names)
            writer = writer or pacsv.CSVWriter(sink, table.schema, write_options=options)
            writer.write_table(table)
        if writer is not None:
            writer.close()


def write_json_lines(path: Path, columns) -> None:
    """The 2014 review dump's fields, one object per line, joined by Arrow (no Python per row)."""
    with open(path, "wb") as out:
        for u, i, r, t in columns:
            day = pc.strftime(pc.cast(t, pa.timestamp("s")), format="%m %d, %Y")
            text = pc.cast(t, pa.string())
            lines = pc.binary_join_element_wise(
                '{"reviewerID": "', u, '", "asin": "', i, '", "reviewerName": "synthetic", "helpful": [0, 0], '
                '"reviewText": "Synthetic review for benchmarks.", "overall": ', r, ', "summary": "synthetic", '
                '"unixReviewTime": ', text, ', "reviewTime": "', day, '"}\n', "")
            lines = lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines
            offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(lines) + 1, offset=lines.offset * 4)
            out.write(memoryview(lines.buffers()[2])[offsets[0]:offsets[-1]])


def generate(shape: Shape, root: str | Path, seed: int = 0, force: bool = False) -> dict:
    """Draw ``shape`` and write it under ``root`` in its layout (reused when the same shape and seed are there).
    Returns what was written: ``path``, the counts, ``seconds``."""
    root = Path(root)
    path = data_file(shape, root)
    manifest = path.parent / "SYNTHETIC.json"
    wanted = json.loads(json.dumps({"shape": dataclasses.asdict(shape), "seed": seed}))  # as the manifest reads back
    if not force and path.is_file() and manifest.is_file():
        found = json.loads(manifest.read_text())
        if {k: found.get(k) for k in wanted} == wanted:
            return found
    started = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    user, item = draw_pairs(shape, seed)
    stars = ratings(shape, len(user), rng)
    ts = timestamps(shape, user, rng)
    user_ids, item_ids = original_ids(shape, rng)
    if shape.layout == "ml20m":  # GroupLens sorts by userId, then movieId
        order = np.lexsort((item_ids.to_numpy()[item], user))
        user, item, stars, ts = user[order], item[order], stars[order], ts[order]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    columns = _csv_chunks(shape, user_ids, item_ids, user, item, stars, ts)
    (write_json_lines if shape.layout == "amazon_json" else lambda p, c: write_csv(p, shape, c))(tmp, columns)
    tmp.replace(path)
    per_user = np.bincount(user, minlength=shape.n_users)
    per_item = np.bincount(item, minlength=shape.n_items)
    summary = {
        **wanted, "purpose": "synthetic data for benchmarks only: not MovieLens or Amazon data, never for results",
        "path": str(path), "users": int((per_user > 0).sum()), "items": int((per_item > 0).sum()),
        "interactions": len(user), "max_per_user": int(per_user.max()), "median_per_user": float(np.median(per_user)),
        "top_item_share": float(per_item.max() / len(user)), "min_per_item": int(per_item.min()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    manifest.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m recpost.bench.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, choices=sorted(PRESETS), help="a preset (else give the counts)")
    parser.add_argument("--root", required=True, help="data root to write into (use it as RECPOST_DATA_DIR)")
    parser.add_argument("--layout", default=None, choices=["ml20m", "amazon_csv", "amazon_json"])
    parser.add_argument("--users", type=int)
    parser.add_argument("--items", type=int)
    parser.add_argument("--interactions", type=int)
    parser.add_argument("--half_stars", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="write again even if this shape and seed are there")
    args = parser.parse_args(argv)
    if args.shape:
        shape = preset(args.shape, args.layout)
    elif None in (args.users, args.items, args.interactions):
        raise RecpostError("give --shape, or all of --users, --items and --interactions")
    else:
        shape = Shape(args.users, args.items, args.interactions, layout=args.layout or "ml20m", half_stars=args.half_stars,
                      rating_probs=PRESETS["ml20m" if args.half_stars else "books"].rating_probs)
    summary = generate(shape, args.root, args.seed, args.force)
    for key in ("path", "users", "items", "interactions", "max_per_user", "median_per_user", "top_item_share", "seconds"):
        print(f"{key}: {summary[key]}")
    return summary


if __name__ == "__main__":
    main()
