"""Half-star data end to end: MovieLens ``latest-small`` in its official zip trains and tests through the CLI,
and half stars are rewards, liked targets and min-max rewards as for whole stars."""

from __future__ import annotations

import json
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from recpost.data import MovieLens, RecDataModule
from tests.helpers import latest_run, recpost

N_USERS = 60
HALF_STARS = np.arange(1, 11) / 2  # 0.5, 1.0, ..., 5.0


def write_latest_small_zip(root: Path, n_users: int = N_USERS, n_movies: int = 30, seed: int = 0) -> Path:
    """``<root>/ml-latest-small.zip`` as GroupLens ships it (``ml-latest-small/ratings.csv`` with a header,
    half-star ratings, sparse movie ids), 6-14 ratings per user."""
    rng = np.random.default_rng(seed)
    movies = 1 + 7 * np.arange(n_movies) ** 2  # ids with gaps, as in the real file
    lines = ["userId,movieId,rating,timestamp"]
    for user in range(1, n_users + 1):
        for t, movie in enumerate(rng.choice(movies, size=int(rng.integers(6, 15)), replace=False)):
            lines.append(f"{user},{movie},{rng.choice(HALF_STARS)},{964_982_703 + 60 * t}")
    path = root / "ml-latest-small.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-latest-small/README.txt", "Summary\n=======\n")
        zf.writestr("ml-latest-small/movies.csv", "movieId,title,genres\n1,Toy Story (1995),Animation\n")
        zf.writestr("ml-latest-small/ratings.csv", "\n".join(lines) + "\n")
    return path


def test_half_stars_set_liked_targets_by_the_threshold_and_span_minmax_rewards(tmp_path):
    write_latest_small_zip(tmp_path)
    dm = RecDataModule(MovieLens("latest-small", root=str(tmp_path), download=False), reward_transform="minmax",
                       liked_threshold=4.0, cache_dir=str(tmp_path / "cache"))
    assert dm.source.rating_range == (0.5, 5.0)
    assert dm.rewards(np.array([0.5, 2.75, 5.0])).tolist() == [0.0, 0.5, 1.0]
    batch = dm.eval_batch(list(range(dm.data.n_users)), "test")
    ratings, liked = batch["target_rating"].numpy(), batch["target_liked"].numpy()
    assert set(ratings) - set(np.floor(ratings)), "the fixture should have half-star targets"
    assert (liked == (ratings >= 4.0)).all()
    assert not liked[ratings == 3.5].any() and liked[ratings == 4.5].all()


@pytest.mark.slow
def test_a_half_star_dataset_trains_and_tests_through_the_cli(tmp_path):
    write_latest_small_zip(tmp_path)
    config = tmp_path / "latest_small.yaml"
    config.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        data:
          source:
            class_path: recpost.data.MovieLens
            init_args: {{variant: latest-small, root: {tmp_path}, download: false}}
          max_len: 8
          batch_size: 32
          reward_transform: identity   # rewards 0.5..5
          liked_threshold: 4.0         # 4, 4.5 and 5 stars are liked
        model:
          class_path: recpost.methods.ExpSFT
          init_args:
            lam: 1.0                   # a 5-star target weighs e^4.5 ~ 90 times a half-star one
            backbone: {{d_model: 16, n_layers: 1, n_heads: 2, dropout: 0.1}}
            lr: 0.01
        trainer:
          accelerator: cpu
          devices: 1
          max_epochs: 2
          enable_progress_bar: false
          enable_model_summary: false
          log_every_n_steps: 1
          default_root_dir: {tmp_path / "runs"}
        """))
    fit = recpost("fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-3000:]
    checkpoint = latest_run(tmp_path / "runs").best_checkpoint
    test = recpost("test", "--config", str(config), "--ckpt_path", str(checkpoint),
                   "--trainer.default_root_dir", str(tmp_path / "test"))
    assert test.returncode == 0, test.stderr[-3000:]
    metrics = json.loads(latest_run(tmp_path / "test").metrics_json("test").read_text())
    assert metrics["test/n_users"] == N_USERS
    assert {"test/ndcg@10", "test/ndcg@10_liked", "test/hr@10_liked"} <= set(metrics)
    assert metrics["test/rating@10"] == 0 or 0.5 <= metrics["test/rating@10"] <= 5.0
