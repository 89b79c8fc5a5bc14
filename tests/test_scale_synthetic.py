"""The synthetic data at any shape (recpost.bench.synthetic): written in the official layouts, read by the real
loaders (source, validation, preprocessing, cache) with exactly the asked counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recpost.bench.synthetic import PRESETS, Shape, draw_pairs, generate, main
from recpost.core.errors import RecpostError
from recpost.data import Amazon, MovieLens, RecDataModule

HALF = PRESETS["ml20m"].rating_probs
WHOLE = PRESETS["books"].rating_probs


def loaded(source, tmp_path, min_interactions=0):
    """The interactions as a DataModule reads them: source, validation, preprocessing, cache."""
    return RecDataModule(source, min_interactions=min_interactions, cache_dir=str(tmp_path / "cache")).data


def test_the_ml20m_layout_loads_through_movielens_with_the_asked_counts_in_half_stars(tmp_path):
    shape = Shape(40, 70, 900, layout="ml20m", min_per_user=8, half_stars=True, rating_probs=HALF)
    generate(shape, tmp_path / "data")
    assert (tmp_path / "data" / "ml-20m" / "ratings.csv").read_text().splitlines()[0] == "userId,movieId,rating,timestamp"
    data = loaded(MovieLens("20m", root=str(tmp_path / "data"), download=False), tmp_path)
    assert (data.n_users, data.n_items, len(data.item)) == (40, 70, 900)  # no repeated pair was dropped
    assert np.diff(data.offsets).min() >= 8
    assert set(np.unique(data.rating)) <= set(np.arange(1, 11) / 2) and (data.rating % 1 == 0.5).any()


@pytest.mark.parametrize("layout, file", [("amazon_csv", "ratings"), ("amazon_json", "reviews_5core")])
def test_the_amazon_layouts_load_through_amazon_and_survive_its_5_core_whole(tmp_path, layout, file):
    shape = Shape(60, 50, 800, layout=layout, min_per_user=5, min_per_item=5, rating_probs=WHOLE)
    generate(shape, tmp_path / "data")
    data = loaded(Amazon("Books", file=file, root=str(tmp_path / "data")), tmp_path, min_interactions=5)
    assert (data.n_users, data.n_items, len(data.item)) == (60, 50, 800)
    assert set(np.unique(data.rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    meta = json.loads((tmp_path / "data" / "amazon" / "SYNTHETIC.json").read_text())
    assert "benchmarks only" in meta["purpose"] and meta["seed"] == 0


def test_the_same_shape_and_seed_are_reused_not_drawn_again(tmp_path):
    shape = Shape(30, 40, 300)
    first = generate(shape, tmp_path)
    stamp = (tmp_path / "ml-20m" / "ratings.csv").stat().st_mtime_ns
    assert generate(shape, tmp_path) == first and (tmp_path / "ml-20m" / "ratings.csv").stat().st_mtime_ns == stamp
    assert generate(shape, tmp_path, seed=1)["seed"] == 1  # another seed is drawn


def test_pairs_are_distinct_every_item_keeps_its_copies_and_popularity_is_skewed():
    shape = Shape(300, 200, 9_000, min_per_user=5, min_per_item=3, item_exponent=1.2, item_offset=1.0)
    user, item = draw_pairs(shape, seed=3)
    assert len(np.unique(user * shape.n_items + item)) == len(user) == 9_000
    counts = np.bincount(item, minlength=shape.n_items)
    assert counts.min() >= 3
    assert np.sort(counts)[-20:].sum() > 4 * np.sort(counts)[:20].sum()  # a power law, not uniform
    per_user = np.bincount(user, minlength=shape.n_users)
    assert per_user.min() >= 5 and per_user.max() <= shape.max_per_user and np.all(np.diff(user) >= 0)


def test_the_same_seed_draws_the_same_data_and_another_seed_other_data():
    shape = Shape(50, 60, 700)
    a, b, c = draw_pairs(shape, 1), draw_pairs(shape, 1), draw_pairs(shape, 2)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])


def test_an_impossible_shape_is_one_clear_error(tmp_path):
    with pytest.raises(RecpostError, match="do not fit"):
        generate(Shape(10, 30, 5_000), tmp_path)  # 500 each, but at most a third of 30 items
    with pytest.raises(RecpostError, match="give --shape, or all of"):
        main(["--root", str(tmp_path), "--users", "5"])


def test_the_presets_copy_the_published_counts():
    assert (PRESETS["ml20m"].n_users, PRESETS["ml20m"].n_items, PRESETS["ml20m"].n_interactions) == (138_493, 26_744, 20_000_263)
    assert PRESETS["ml20m"].half_stars and not PRESETS["books"].half_stars
    books = PRESETS["books"]
    assert (books.n_users, books.n_items, books.n_interactions, books.min_per_item) == (603_668, 367_982, 8_898_041, 5)
