"""``RecDataModule``: splits, training windows and evaluation batches for every method.

Split (leave-one-out per user): the last interaction is the test target, the second to last the
validation target, the rest the training sequence. Validation histories stop before the validation
target; test histories include it (it happened before the test target) but never the test target.
Nothing of a target - id, rating or timestamp - enters the model's input.

Batches (``recpost.core.batch``: keys, shapes) are built by ``train_batch`` / ``eval_batch`` from index
arrays with numpy fancy indexing (one gather per batch, no per-row Python), left-padded with item 0
so the newest item is always last.

The split rule lives here and only here (``HELD_OUT``); what other layers need of it is exposed as
methods: ``training_interactions`` (the reward model's bias initialisation and rating baselines),
``train_item_counts`` (the popularity sampler), ``train_target_rewards`` (the weight figures).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from recpost.core.batch import EvalBatch, TrainBatch
from recpost.data.arrays import IndexDataset, count_values, earlier_items, gather_left_padded, gather_sequences
from recpost.data.cache import Interactions, PreprocessOptions, build_cache, open_cache
from recpost.data.sampling import LengthGroupedSampler
from recpost.data.shards import WindowShard, rank_windows
from recpost.data.sources import Source
from recpost.data.validation import check_options
from recpost.core.errors import RecpostError

log = logging.getLogger(__name__)

# Evaluation split names -> how many trailing interactions are held out after the history.
HELD_OUT = {"val": 2, "test": 1, "predict": 0}


@dataclass(frozen=True)
class TrainingInteractions:
    """The training part of every user's sequence (no validation or test target), flat, user-major.

    ``weight`` is how many times the user's windows are trained on per epoch: 1, or the user's count
    in a bootstrap resample (``data.train_users: bootstrap``).
    """

    item: np.ndarray  # [N] int64, 1..n_items
    rating: np.ndarray  # [N] float32
    user: np.ndarray  # [N] int64, 0..n_users - 1
    weight: np.ndarray  # [N] float64


class RecDataModule(L.LightningDataModule):
    """Data for training and evaluating sequential recommenders.

    Args:
        source: where the interactions come from (``recpost.data.MovieLens``, ``Amazon``, ``Table``,
            ``Simulator``).
        max_len: longest history the model sees (positions). Training sequences longer than
            ``max_len + 1`` are cut into consecutive windows so every interaction is a target once.
        batch_size: training windows per batch.
        eval_batch_size: users per evaluation batch.
        min_interactions: iterative k-core filter on users and items (0 = off; Amazon's usual: 5).
        duplicates: exact (user, item, timestamp) repeats are dropped with a warning (``drop``) or
            rejected (``error``).
        keep_repeats: keep later interactions with an item the user already had. Off by default:
            rating data has one rating per item, and with history masking a repeated target could
            never be recommended.
        reward_transform: observed reward from the rating: ``identity`` (stars as they are),
            ``centered`` (rating minus the training mean) or ``minmax`` (mapped to [0, 1] over the
            source's rating range). Exp-weighted SFT's ``lam`` is on this scale.
        liked_threshold: targets with rating >= this count as liked (``*_liked`` metrics).
        eval_min_rating: evaluate only the users whose held-out target is rated >= this (the paper's
            protocol: 4.5): validation keeps the users whose validation target qualifies, test those whose
            test target does; histories, full-catalog ranking and masking are unchanged, and ``n_users`` in
            the metrics counts who is left (also logged at setup). ``null``: every user. The metrics over
            all targets are the same run's test without it (``--data.eval_min_rating null``).
        train_users: ``all`` users' training windows, or a ``bootstrap`` resample of the users (drawn with
            replacement; a user drawn twice has their windows twice per epoch). Evaluation uses every
            user (or those ``eval_min_rating`` keeps). The experiment's evaluator reward model trains on a bootstrap resample, so its
            errors are not a copy of the training reward model's.
        train_users_seed: seed of the bootstrap resample.
        length_grouping: batches of training windows of similar length (``data/sampling.py``), so an
            epoch computes little padding: each epoch, pools of this many batches are sorted by length;
            0 = plain shuffled batches. Every window is still used once per epoch.
        train_samples: ``windows`` (default, as the original SASRec code): a user's sequence cut into windows
            of ``max_len`` targets, a loss at every position. ``prefixes`` (RecBole's sequential models): one
            sample per target, its last ``max_len`` items as input, the loss at the last position only. Both
            use every target once per epoch; ``prefixes`` gives each its full history and many times more
            samples (optimiser steps) per epoch, each epoch as much costlier.
        per_rank_windows: under DDP each rank builds, and trains on, only its own block of users' windows
            (``data/shards.py``); off: every rank builds all of them and the distributed sampler picks its share.
        num_workers: DataLoader workers (batches are gathered vectorised; 0 is usually fastest).
        cache_dir: where the preprocessed interactions live; default ``$RECPOST_CACHE_DIR`` or
            ``~/.cache/recpost/cache``.
    """

    def __init__(
        self,
        source: Source,
        max_len: int = 50,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        min_interactions: int = 0,
        duplicates: Literal["drop", "error"] = "drop",
        keep_repeats: bool = False,
        reward_transform: Literal["identity", "centered", "minmax"] = "identity",
        liked_threshold: float = 4.0,
        eval_min_rating: float | None = None,
        train_users: Literal["all", "bootstrap"] = "all",
        train_users_seed: int = 0,
        length_grouping: int = 0,
        train_samples: Literal["windows", "prefixes"] = "windows",
        per_rank_windows: bool = True,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_options(max_len=max_len, batch_size=batch_size, eval_batch_size=eval_batch_size,
                      min_interactions=min_interactions, duplicates=duplicates, reward_transform=reward_transform,
                      length_grouping=length_grouping, train_users=train_users, eval_min_rating=eval_min_rating,
                      rating_range=source.rating_range, train_samples=train_samples)
        self.source = source
        self.max_len = max_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.options = PreprocessOptions(min_interactions=min_interactions, duplicates=duplicates, keep_repeats=keep_repeats)
        self.reward_transform = reward_transform
        self.liked_threshold = liked_threshold
        self.eval_min_rating = eval_min_rating
        self.train_users = train_users
        self.train_users_seed = train_users_seed
        self.length_grouping = length_grouping
        self.train_samples = train_samples
        self.per_rank_windows = per_rank_windows
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._data: Interactions | None = None
        self._windows: tuple[np.ndarray, np.ndarray] | None = None
        self._shard: WindowShard | None = None  # this DDP rank's share of the windows (None: all of them)
        self._ground_truth = None
        self._train_mean: float | None = None

    @classmethod
    def from_configs(cls, paths: Sequence[str | Path]) -> RecDataModule:
        """The DataModule of ``recpost fit --config P1 --config P2 ...``: the ``data:`` sections of the
        YAML files composed in order, without the CLI (no model, no trainer)."""
        from jsonargparse import ArgumentParser

        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "data")
        cfg = None
        for path in paths:
            data = (yaml.safe_load(Path(path).read_text()) or {}).get("data")
            if data:
                try:
                    cfg = parser.parse_object({"data": data}, namespace=cfg)
                except Exception as exc:  # noqa: BLE001 - jsonargparse's errors say which value; one line here
                    raise RecpostError(f"{path}: its data section does not parse ({str(exc).splitlines()[0]})") from None
        if cfg is None:
            raise RecpostError(f"none of {[str(p) for p in paths]} has a data: section; pass the fit config(s) of the run")
        return parser.instantiate_classes(cfg).data

    # ----------------------------------------------------------------------------------- loading
    def prepare_data(self) -> None:
        build_cache(self.source, self.options, self.cache_dir)

    @property
    def data(self) -> Interactions:
        """The cached interactions (built on first use; every DDP rank opens the same files)."""
        if self._data is None:
            self._data = open_cache(self.source, self.options, self.cache_dir)
        return self._data

    @property
    def n_items(self) -> int:
        """Catalog size (internal ids 1..n_items; 0 is padding). Linked into the model."""
        return self.data.n_items

    @property
    def item_map_hash(self) -> str:
        """Identifies the item id map; stored in every checkpoint and checked when loading one."""
        return self.data.item_map_hash

    @property
    def ground_truth(self):
        """True rewards for evaluation, when the source knows them (the simulator); else ``None``."""
        if self._ground_truth is None and hasattr(self.source, "ground_truth"):
            self._ground_truth = self.source.ground_truth(self.data)
        return self._ground_truth

    def setup(self, stage: str | None = None) -> None:
        data = self.data
        stats = data.meta
        log.info(
            "%s: %d users, %d items, %d interactions (dropped %d short users)",
            self.source.name, data.n_users, data.n_items, len(data.item), stats.get("dropped_short_users", 0),
        )
        if self.eval_min_rating is not None:
            counts = {split: len(self.eval_users(split)) for split in ("test", "val")}
            log.info("eval_min_rating %g: %s of %s test users, %s of %s validation users", self.eval_min_rating,
                     f"{counts['test']:,}", f"{data.n_users:,}", f"{counts['val']:,}", f"{data.n_users:,}")

    # ----------------------------------------------------------------------------------- rewards
    @property
    def rating_range(self) -> tuple[float, float]:
        """The lowest and highest rating the source allows (its rating scale)."""
        lo, hi = self.source.rating_range
        return float(lo), float(hi)

    @property
    def reward_range(self) -> tuple[float, float]:
        """The rewards of the lowest and highest rating under ``reward_transform`` (identity on 1..5 stars:
        ``(1, 5)``; minmax: ``(0, 1)``): the bound of ``weight_norm: fixed`` in the weighted SFT methods."""
        lo, hi = self.rewards(np.asarray(self.rating_range, dtype=np.float64))
        return float(lo), float(hi)

    def rewards(self, rating: np.ndarray) -> np.ndarray:
        """Observed reward of a rating under ``reward_transform``."""
        if self.reward_transform == "identity":
            return rating
        if self.reward_transform == "centered":
            return rating - self._train_mean_rating
        lo, hi = self.source.rating_range
        return (rating - lo) / (hi - lo)

    @property
    def _train_mean_rating(self) -> float:
        """Mean rating over training interactions (no validation or test target); computed once."""
        if self._train_mean is None:
            self._train_mean = float(self.data.rating[self._in_train()].mean())
        return self._train_mean

    def _in_train(self) -> np.ndarray:
        """``[n_interactions]`` bool: the interaction is in a training sequence (not a validation or test target).
        One byte per interaction: every rank computes it over the whole data (ML-20M: 19 MiB, was 320 MiB)."""
        d = self.data
        in_train = np.ones(len(d.item), dtype=bool)
        for held in range(1, HELD_OUT["val"] + 1):  # each user's last HELD_OUT["val"] interactions
            in_train[np.maximum(d.offsets[1:] - held, d.offsets[:-1])] = False
        return in_train

    def train_user_weights(self) -> np.ndarray:
        """``[n_users]``: how many times each user's training windows are used per epoch (1 each, or the
        user's count in the bootstrap resample of ``train_users: bootstrap``)."""
        n_users = self.data.n_users
        if self.train_users == "all":
            return np.ones(n_users, dtype=np.int64)
        drawn = np.random.default_rng(self.train_users_seed).integers(0, n_users, size=n_users)
        return np.bincount(drawn, minlength=n_users)

    def training_interactions(self) -> TrainingInteractions:
        """Every user's training interactions (validation and test targets excluded), with the user's
        weight in training (see ``train_user_weights``)."""
        d = self.data
        in_train = self._in_train()
        user = np.repeat(np.arange(d.n_users), np.diff(d.offsets))[in_train]
        return TrainingInteractions(
            item=d.item[in_train], rating=d.rating[in_train], user=user,
            weight=self.train_user_weights()[user].astype(np.float64),
        )

    def train_item_counts(self) -> np.ndarray:
        """How often each item occurs in the training interactions ``[n_items + 1]`` (index 0, padding: 0).

        Validation and test targets are not counted. The popularity sampler of a sampled softmax
        (``model.negative_sampler: popularity``) draws negatives in proportion to these.
        """
        d, n = self.data, self.data.n_items + 1
        held_out = d.item[np.flatnonzero(~self._in_train())]  # a few per user: no copy of the whole item column
        return count_values(d.item, n) - np.bincount(held_out, minlength=n)

    def train_target_rewards(self) -> np.ndarray:
        """The reward of every training target ``[N]`` (each training interaction but a user's first, the
        targets one training epoch sees exactly once), under ``reward_transform``."""
        d = self.data
        target = self._in_train()
        target[d.offsets[:-1][np.diff(d.offsets) > 0]] = False  # a user's first item is an input only
        return np.asarray(self.rewards(d.rating[target]), dtype=np.float32)

    # ----------------------------------------------------------------------------------- training
    def train_windows(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) of every training window (up to ``max_len + 1`` items): ``train_samples: windows``
        cuts each user's training sequence from the end into windows of ``max_len`` targets sharing one item,
        ``prefixes`` ends one window at each target; every target is used once (``sampling.training_windows``).
        Under DDP with ``per_rank_windows``: this rank's users' windows only (``shards.rank_windows``)."""
        if self._windows is None:
            per_window, o = (self.max_len if self.train_samples == "windows" else 1), self.data.offsets
            w_start, w_end, self._shard = rank_windows(
                o[:-1], o[1:] - HELD_OUT["val"], self.max_len, per_window, self.train_user_weights(),
                self.train_users == "bootstrap", self.trainer if self.per_rank_windows else None)
            if len(w_start) == 0:
                raise RecpostError(f"{self.source.name}: no training targets (every user has < 2 training interactions)")
            self._windows = (w_start, w_end)
        return self._windows

    def train_window_targets(self) -> np.ndarray:
        """Next-item targets of each training window: ``end - start - 1``, or 1 for ``prefixes``."""
        w_start, w_end = self.train_windows()
        return np.ones_like(w_start) if self.train_samples == "prefixes" else w_end - w_start - 1

    def train_batch(self, windows: Sequence[int]) -> TrainBatch:
        """The training batch of the given window indices (rows of ``train_windows``); see ``TrainBatch``."""
        s, e = (bound[np.asarray(windows, dtype=np.int64)] for bound in self.train_windows())
        width = int((e - s).max())  # items incl. the last target; inputs are width - 1
        items, ratings, timestamps = gather_sequences(self.data, s, e, width)  # [B, W] each
        inputs, targets = items[:, :-1], items[:, 1:]
        targets = np.where(inputs > 0, targets, 0)  # the first item of a window is input only
        if self.train_samples == "prefixes":  # one target per sample: the window's last item
            targets[:, :-1] = 0
        target_ratings = np.where(targets > 0, ratings[:, 1:], 0.0)
        rewards = np.where(targets > 0, self.rewards(target_ratings), 0.0)  # no reward without a target
        earlier = earlier_items(self.data, s)  # [B, H]
        return {
            "input_items": torch.from_numpy(inputs),
            "input_ratings": torch.from_numpy(np.ascontiguousarray(ratings[:, :-1])),
            "input_timestamps": torch.from_numpy(np.ascontiguousarray(timestamps[:, :-1])),
            "next_items": torch.from_numpy(np.ascontiguousarray(targets)),
            "next_ratings": torch.from_numpy(target_ratings.astype(np.float32)),
            "next_rewards": torch.from_numpy(rewards.astype(np.float32)),
            "next_liked": torch.from_numpy((targets > 0) & (target_ratings >= self.liked_threshold)),
            "earlier_items": torch.from_numpy(earlier),
        }

    def train_dataloader(self) -> DataLoader:
        w_start, w_end = self.train_windows()
        order = LengthGroupedSampler(w_end - w_start, self.batch_size, self.length_grouping) if self.length_grouping else None
        if self._shard is not None:  # DDP: this rank's windows, as many as every rank's (Lightning adds no sampler)
            order = self._shard.sampler(order, len(w_start))
        return DataLoader(
            IndexDataset(len(w_start)), batch_size=self.batch_size, collate_fn=self.train_batch, sampler=order,
            shuffle=order is None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    # ----------------------------------------------------------------------------------- evaluation
    def eval_batch(self, users: Sequence[int], split: Literal["val", "test", "predict"]) -> EvalBatch:
        """The evaluation batch of the given users (rows 0..n_users - 1) for ``split``; see ``EvalBatch``."""
        d = self.data
        u = np.asarray(users, dtype=np.int64)
        start = d.offsets[u]
        hist_end = d.offsets[u + 1] - HELD_OUT[split]
        items, ratings, timestamps = gather_sequences(d, start, hist_end, int(min(self.max_len, (hist_end - start).max())))
        batch = {
            "user_index": torch.from_numpy(u),
            "input_items": torch.from_numpy(items),
            "input_ratings": torch.from_numpy(ratings),
            "input_timestamps": torch.from_numpy(timestamps),
            "history_items": torch.from_numpy(gather_left_padded(d.item, start, hist_end, int((hist_end - start).max()))),
        }
        if split != "predict":
            rating = d.rating[hist_end]
            batch.update(
                target_item=torch.from_numpy(d.item[hist_end]),
                target_rating=torch.from_numpy(rating.astype(np.float32)),
                target_liked=torch.from_numpy(rating >= self.liked_threshold),
            )
        return batch

    def eval_users(self, split: Literal["val", "test", "predict"]) -> np.ndarray:
        """The users (rows) that ``split`` evaluates: every user, or with ``eval_min_rating`` those whose
        held-out target of that split is rated at least that (prediction: every user)."""
        d = self.data
        if self.eval_min_rating is None or split == "predict":
            return np.arange(d.n_users)
        users = np.flatnonzero(d.rating[d.offsets[1:] - HELD_OUT[split]] >= self.eval_min_rating)
        if len(users) == 0:
            raise RecpostError(f"data.eval_min_rating {self.eval_min_rating:g} leaves no user to evaluate: no {split} "
                               f"target is rated >= {self.eval_min_rating:g}; lower it, or null to evaluate every user")
        return users

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            IndexDataset(self.eval_users(split)), batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=partial(self.eval_batch, split=split), num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Every user with their whole sequence as history: recommendations for the next item."""
        return self._eval_loader("predict")

    def original_item_ids(self, internal: np.ndarray) -> list:
        """Map internal item ids (1..n_items) back to the source's ids."""
        col = self.data.item_ids.data.table.column("item_id")
        return col.take(np.asarray(internal).ravel() - 1).to_pylist()

