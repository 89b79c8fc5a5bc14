"""Summaries over seeds and the paired bootstrap of a method against the reference.

A difference between two methods on the same test users varies with the test users drawn and with
training (initialisation, batch order: the seed). With one seed only the first is measurable, so an
interval from one seed is too narrow to call a difference significant; with several seeds both are
resampled (:func:`paired_bootstrap`).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

BOOTSTRAP_SAMPLES = 2000
# Values held at once by the two-level bootstrap ([replicates, users] per chunk), so that catalogs
# with 10^5 test users stay within ~100 MB.
CHUNK_VALUES = 1 << 24


def fmt(values: list[float]) -> str:
    """``mean ± std`` over seeds (NaNs left out), one value as it is, ``-`` for none."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def paired_bootstrap(runs: list[tuple[dict, dict]], metric: str, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> tuple[float, float, float] | None:
    """Mean difference of ``metric`` (method - reference) over users, with a 95% percentile interval.

    ``runs`` holds one (method per-user rows, reference per-user rows) pair per seed; the users are
    the same in every seed (the split does not depend on it). One seed: users are resampled with
    replacement. Several seeds: a two-level bootstrap, each replicate draws seeds with replacement,
    then users with replacement, and averages the per-user differences of the drawn seeds, so the
    interval also holds the seed-to-seed (training) variance. Returns (mean, low, high) or None.
    """
    diffs = _differences(runs, metric)
    if diffs is None:
        return None
    rng = np.random.default_rng(seed)
    if len(diffs) == 1:
        d = diffs[0]
        means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)  # [samples]
    else:
        means = _seeds_and_users(diffs, rng, samples)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diffs.mean()), float(low), float(high)


def _differences(runs: list[tuple[dict, dict]], metric: str) -> np.ndarray | None:
    """``[seeds, users]`` differences over the users every seed has (in the first seed's order)."""
    per_seed = [{user: row[metric] - ref_rows[user][metric] for user, row in method_rows.items()
                 if user in ref_rows and metric in row and metric in ref_rows[user]} for method_rows, ref_rows in runs]
    per_seed = [d for d in per_seed if d]
    if not per_seed:
        return None
    users = [u for u in per_seed[0] if all(u in d for d in per_seed[1:])]
    if not users:
        return None
    return np.array([[d[u] for u in users] for d in per_seed])


def _seeds_and_users(diffs: np.ndarray, rng: np.random.Generator, samples: int) -> np.ndarray:
    """Two-level bootstrap means of ``diffs [S, U]``: per replicate, S seeds then U users with replacement."""
    n_seeds, n_users = diffs.shape
    chunk = max(1, CHUNK_VALUES // n_users)
    means = []
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        seeds = rng.integers(0, n_seeds, size=(n, n_seeds))  # [n, S]
        seed_counts = (seeds[:, :, None] == np.arange(n_seeds)).sum(axis=1)  # [n, S]
        per_user = seed_counts @ diffs / n_seeds  # [n, U]: each user's mean over the drawn seeds
        users = rng.integers(0, n_users, size=(n, n_users))  # [n, U]
        means.append(np.take_along_axis(per_user, users, axis=1).mean(axis=1))  # [n]
    return np.concatenate(means)
