"""The simulator as a data ``Source``: users' sequences drawn from ``pi_beta`` in a simulated world."""

from __future__ import annotations

import dataclasses
import logging

import pyarrow as pa
import torch

from recpost.data.interactions import Interactions
from recpost.data.simulator.config import WorldConfig, check
from recpost.data.simulator.rng import STREAM_FEEDBACK, STREAM_LENGTHS, STREAM_NOISE, STREAM_SHUFFLE, stream_generator
from recpost.data.simulator.truth import SimulatorTruth
from recpost.data.simulator.world import RATING_MAX, RATING_MIN, SimWorld
from recpost.data.sources import Source

log = logging.getLogger(__name__)

WORLD_VERSION = 1  # bump when generation changes, so cached simulator data is rebuilt
# Settings added after version 1: the cache key names one only when it is not its default, so the data
# of every world that existed before them keeps its key (and its cache), and their defaults change nothing.
LATER_SETTINGS = (
    "taste_interaction", "satiation", "satiation_window", "exposure_concentration", "rarity_from", "feedback_rate",
    "shuffle_ratings",
)


class Simulator(Source):
    """Synthetic sequential data with known true rewards and behaviour policy (the default data).

    Each user's sequence is sampled from ``pi_beta``; ``timestamp`` is the step index. Use it through
    ``RecDataModule`` like any source; the DataModule also gets :meth:`ground_truth` from it, which
    adds ``true_reward@10``, ``true_ndcg@10``, ``regret@10``, ``true_reward_sampled``,
    ``true_reward@10_behavior`` and ``true_reward@10_oracle`` to every validation and test run.
    See ``docs/simulator.md``.

    The world's settings are one :class:`WorldConfig` (a nested ``world:`` group in YAML); only the
    sequence lengths belong to the source. ``self.world`` is the :class:`SimWorld` built from it.

    Args:
        world: the world's settings (users, items, true reward, behaviour policy, noise, seed).
        min_seq_len: shortest sequence (>= 3: a training item, a validation and a test target).
        max_seq_len: longest sequence; lengths are uniform in ``[min_seq_len, max_seq_len]``.
    """

    rating_range = (RATING_MIN, RATING_MAX)

    def __init__(self, world: WorldConfig = WorldConfig(), min_seq_len: int = 20, max_seq_len: int = 60) -> None:
        check(
            isinstance(world, WorldConfig),
            f"simulator world must be a WorldConfig (got {type(world).__name__}); build it with "
            "recpost.data.simulator.WorldConfig(...)",
        )
        check(
            int(min_seq_len) == min_seq_len and min_seq_len >= 3,
            f"simulator min_seq_len must be an integer >= 3 (got {min_seq_len}): each user needs a training item, "
            "a validation and a test target",
        )
        check(max_seq_len >= min_seq_len, f"simulator max_seq_len ({max_seq_len}) must be >= min_seq_len ({min_seq_len})")
        settings = {k: v for k, v in dataclasses.asdict(world).items() if k not in LATER_SETTINGS}
        sizes = {k: settings.pop(k) for k in ("n_users", "n_items")}
        # Flat, in the order of the former flat signature, later settings only when set: the cache key
        # (fingerprint) of every earlier world is unchanged.
        self.knobs = {**sizes, "min_seq_len": min_seq_len, "max_seq_len": max_seq_len, **settings,
                      **world.changed_from_default(LATER_SETTINGS)}
        self.world = SimWorld(world)
        reachable = self.world.candidates or self.world.n_items
        what, knob = ("candidates per user", "candidates") if self.world.candidates else ("catalog", "n_items")
        check(
            max_seq_len <= reachable,
            f"simulator max_seq_len={max_seq_len} is longer than the {what} ({reachable}); lower max_seq_len or "
            f"raise {knob}",
        )
        self.min_seq_len, self.max_seq_len = int(min_seq_len), int(max_seq_len)
        n_interactions = self.world.n_users * (self.min_seq_len + self.max_seq_len) / 2
        if self.world.candidates is None and n_interactions * self.world.n_items > 1e12:
            log.warning(
                "simulator: exact generation over %d items for ~%.0e interactions will be slow; set candidates "
                "(e.g. 1000) for large catalogs", self.world.n_items, n_interactions,
            )

    @property
    def name(self) -> str:
        return "sim"

    def fingerprint(self) -> dict:
        """Cache key: every setting, flat and in the order of the former flat signature, so caches of
        data generated before the settings moved into :class:`WorldConfig` stay valid; the settings
        of ``LATER_SETTINGS`` follow, each only when it differs from its default."""
        return {"source": "simulator", "version": WORLD_VERSION, **self.knobs}

    # ----------------------------------------------------------------------------------- delegation
    def true_reward(
        self, users: torch.Tensor, items: torch.Tensor | None = None, history: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``r*`` for world users ``[B]`` over all world items (or ``items [K]``): ``[B, I|K]``, after
        ``history [B, H]`` (world ids, ``-1`` = pad; what satiation looks at)."""
        return self.world.true_reward(users, items, history)

    def behavior_logits(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Logits of ``pi_beta`` over all world items ``[B, n_items]`` (world ids, ``-1`` = pad)."""
        return self.world.behavior_logits(users, history)

    # ----------------------------------------------------------------------------------- generation
    def generate(self) -> dict[str, torch.Tensor]:
        """All consumptions, user-major and chronological: ``user, item, step, r_star, rating, rated`` ``[N]``.

        Users are processed in blocks of ``world.block_size()``; each block has its own random
        streams, so the result depends on the seed and the knobs only. ``rated`` says whether the
        consumption carries a rating (``feedback_rate``); ``load()`` keeps only those. With
        ``shuffle_ratings`` the ratings are permuted across all consumptions (``r_star`` is not).
        """
        w = self.world
        lengths = torch.randint(
            self.min_seq_len, self.max_seq_len + 1, (w.n_users,), generator=stream_generator(w.seed, STREAM_LENGTHS)
        )
        size = w.block_size()
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("user", "item", "step", "r_star", "rating", "rated")}
        for block, start in enumerate(range(0, w.n_users, size)):
            users = torch.arange(start, min(start + size, w.n_users))
            seqs = w.sample_sequences(users, lengths[users], block)  # [b, L]
            valid = seqs >= 0
            user = users[:, None].expand_as(seqs)[valid]  # row-major: user-major, then step
            item = seqs[valid]
            step = torch.arange(seqs.shape[1])[None, :].expand_as(seqs)[valid]
            share = w.sequence_genre_shares(seqs)[valid] if w.satiation else None
            r_star = w.pair_reward(user, item, share)
            rating = w.observe(r_star, item, stream_generator(w.seed, STREAM_NOISE, block))
            rated = torch.ones_like(item, dtype=torch.bool)
            if w.config.feedback_rate < 1:  # its own stream: the other draws stay those of the fully rated world
                coin = torch.rand(item.shape, generator=stream_generator(w.seed, STREAM_FEEDBACK, block))
                rated = coin < w.config.feedback_rate
            for k, v in zip(parts, (user, item, step, r_star, rating, rated)):
                parts[k].append(v)
        data = {k: torch.cat(v) for k, v in parts.items()}
        if w.config.shuffle_ratings:  # across all users and blocks: the distribution stays, the link to r* goes
            order = torch.randperm(len(data["rating"]), generator=stream_generator(w.seed, STREAM_SHUFFLE))
            data["rating"] = data["rating"][order]
        return data

    def load(self) -> pa.Table:
        data = self.generate()
        if not bool(data["rated"].all()):
            data = {k: v[data["rated"]] for k, v in data.items()}
        return pa.table({
            "user_id": pa.array(data["user"].numpy()),
            "item_id": pa.array(data["item"].numpy()),
            "timestamp": pa.array(data["step"].numpy()),
            "rating": pa.array(data["rating"].double().numpy()),
        })

    # ----------------------------------------------------------------------------------- evaluation
    def ground_truth(self, data: Interactions) -> SimulatorTruth:
        """The evaluator for a DataModule built on this source (maps its internal ids to the world's)."""
        raw = data.meta.get("raw_rows", len(data.item))
        if len(data.item) != raw:
            log.warning(
                "simulator: %d of %d generated interactions survived preprocessing (filters?); ground truth uses the "
                "histories the model sees, which then differ from the ones pi_beta saw", len(data.item), raw,
            )
        if self.world.config.feedback_rate < 1:
            log.warning(
                "simulator: feedback_rate=%g: the data holds rated consumptions only, so the histories that the ground "
                "truth and pi_beta's top-10 are computed on lack the unrated items the user consumed",
                self.world.config.feedback_rate,
            )
        return SimulatorTruth(self.world, data)

