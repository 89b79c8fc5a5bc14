"""A synthetic world where the true reward and the behaviour policy are known.

Real logs only show what the logging policy chose and a noisy rating of it; here every quantity the
paper's theory talks about can be computed exactly:

- users and items have latent factors; the **true reward** of item ``i`` for user ``u`` is
  ``r*(u, i) = 1 + 4 * sigmoid(reward_scale * <x_u, v_i> + quality_i)`` on the 1..5 star scale;
- the **behaviour policy** ``pi_beta(i | u, history)`` is a softmax over a mixture of popularity
  (Zipf), taste ``<x_u, v_i>``, a sequential term ``<v_last, v_i>`` and external pressure that has
  nothing to do with taste (a per-item promotion score, and optionally a per-visit slate of promoted
  items), with the items of the history excluded. It never sees item quality, and the popularity and
  pressure terms make users consume items they do not like, so ``pi_beta`` is improvable;
- the **observed rating** is ``r*`` plus noise (optionally heavier for rare items), optionally
  rounded to stars, clipped to 1..5. Methods train on observed ratings; ``r*`` is for evaluation.

Three entry points:

- :class:`Simulator` is a data ``Source`` (sequential mode): users' sequences sampled from
  ``pi_beta``; ``load()`` returns the canonical table and ``ground_truth(data)`` the evaluator that
  the DataModule hands to every method (``true_reward@10``, ``regret@10``, ...).
- :class:`BanditWorld` is the one-step (contextual bandit) view of the same world, for checking
  exponential reward-weighted SFT against ``pi*_lambda ∝ pi_beta * exp(r*/lambda)``.
- :class:`SimWorld` holds the world itself (factors, ``true_reward``, ``behavior_logits``,
  ``observe``) and is shared by both.

Scale. Generation is vectorised in torch: users are processed in blocks whose size keeps each block's
working memory near ``_BLOCK_ELEMENTS`` floats, with a Python loop over sequence steps only. Items
are drawn without replacement from the softmax by inverse CDF, with consumed entries set to
``-inf``. With ``candidates: null`` each step scores the whole catalog (exact, cost
``interactions x n_items``: fine up to ~10^4-10^5 items). For large catalogs set ``candidates``: each
user is then exposed to a fixed, uniformly random subset of that many items (a retrieval stage),
and ``pi_beta`` is the same softmax restricted to that subset, so relative preferences among exposed
items are unchanged and the cost is ``interactions x candidates``. Exposure sets and slates are
counter-based hashes of ``(seed, user, step)``, so ``pi_beta`` can be recomputed for any history
without storing them. Everything is deterministic per seed.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recpost.data.interactions import Interactions
from recpost.data.sources import Source
from recpost.errors import RecpostError

log = logging.getLogger(__name__)

WORLD_VERSION = 1  # bump when generation changes, so cached simulator data is rebuilt
RATING_MIN, RATING_MAX = 1.0, 5.0
TOP_K = 10
_BLOCK_ELEMENTS = 1 << 22  # floats per block of users in generation / evaluation (16 MiB per tensor)
_MERSENNE = 2_147_483_647  # 2^31 - 1: residues times 31-bit constants stay below 2^62 (no overflow)
_HASH_MULT = 0x45D9F3B
_TAG_SLATE, _TAG_POOL = 1, 2  # hash streams
_STREAM_WORLD, _STREAM_LENGTHS, _STREAM_CHOICES, _STREAM_NOISE = 0, 1, 2, 3


def _mix(h: torch.Tensor) -> torch.Tensor:
    """One avalanche round on 31-bit non-negative int64 values."""
    h = h ^ (h >> 16)
    h = (h * _HASH_MULT) % _MERSENNE
    h = h ^ (h >> 15)
    h = (h * _HASH_MULT) % _MERSENNE
    return h ^ (h >> 16)


def _hash(*keys: torch.Tensor | int) -> torch.Tensor:
    """Pseudo-random int64 in ``[0, 2^31)`` from non-negative integer keys (broadcast together).

    Counter-based: the value for ``(seed, tag, user, step, j)`` never depends on which other values
    are computed, which is what lets ``pi_beta`` be recomputed for any single history.
    """
    h = torch.tensor(0x1234567, dtype=torch.int64)
    for k in keys:
        k = torch.as_tensor(k, dtype=torch.int64)
        h = _mix((h * 1_000_003 + k % _MERSENNE) % _MERSENNE)
    return h


def _generator(seed: int, stream: int, block: int = 0) -> torch.Generator:
    """An independent random stream per (seed, purpose, block of users)."""
    key = int(_hash(seed, stream, block)) * _MERSENNE + int(_hash(block, stream, seed))
    return torch.Generator().manual_seed(key)


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` along dim 0 for an index of any shape (``index_select``: on CPU plain advanced
    indexing of small rows can be ~100x slower when several threads are busy)."""
    out = table.index_select(0, index.reshape(-1))
    return out.view(*index.shape, *table.shape[1:])


def _sample_categorical(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from ``softmax(logits)`` ``[n, K] -> [n]`` by inverse CDF (one uniform per row).

    2-3x faster on CPU than Gumbel-max, which needs K random numbers per row. Entries at ``-inf``
    have probability 0 and are never drawn: the CDF is flat there and ``u`` stays below its total.
    """
    dtype = torch.float64 if logits.shape[1] > 4096 else torch.float32  # long CDFs accumulate in fp64
    cdf = torch.softmax(logits, dim=1, dtype=dtype).cumsum_(1)  # [n, K]
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rounding never reaches the end
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RecpostError(message)


class SimWorld:
    """Users, items, true reward, behaviour policy and rating noise (no sequences).

    All knobs are documented on :class:`Simulator`, which passes them through. Item and user indices
    here are the world's own (items ``0..n_items-1``, users ``0..n_users-1``); histories use ``-1``
    for padding.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        latent_dim: int = 8,
        reward_scale: float = 1.5,
        quality_mean: float = 0.0,
        quality_std: float = 1.25,
        popularity_weight: float = 0.2,
        taste_weight: float = 0.4,
        sequential_weight: float = 0.2,
        promotion_weight: float = 0.2,
        behavior_temperature: float = 0.3,
        slate_size: int = 10,
        slate_boost: float = 5.0,
        candidates: int | None = None,
        noise_std: float = 0.5,
        heteroscedasticity: float = 0.0,
        round_to_stars: bool = True,
        seed: int = 0,
    ) -> None:
        for name, value in (("n_users", n_users), ("n_items", n_items), ("latent_dim", latent_dim)):
            _check(
                int(value) == value and value >= 1, f"simulator {name} must be a positive integer (got {value}); set it to >= 1"
            )
        weights = {
            "popularity_weight": popularity_weight, "taste_weight": taste_weight,
            "sequential_weight": sequential_weight, "promotion_weight": promotion_weight,
        }
        negative = {k: v for k, v in weights.items() if v < 0}
        _check(
            not negative, f"simulator behaviour weights must be >= 0, got {negative}; they are shares of the behaviour mixture"
        )
        total = sum(weights.values())
        _check(
            math.isclose(total, 1.0, abs_tol=1e-6),
            f"simulator behaviour weights (popularity, taste, sequential, promotion) must sum to 1, they sum to "
            f"{total:g}; rescale them (behavior_temperature sets how sharp the choice is)",
        )
        _check(behavior_temperature > 0, f"simulator behavior_temperature must be > 0 (got {behavior_temperature})")
        _check(reward_scale >= 0, f"simulator reward_scale must be >= 0 (got {reward_scale})")
        _check(quality_std >= 0, f"simulator quality_std must be >= 0 (got {quality_std})")
        _check(noise_std >= 0, f"simulator noise_std must be >= 0 (got {noise_std}); use 0 for noiseless ratings")
        _check(
            heteroscedasticity >= 0,
            f"simulator heteroscedasticity must be >= 0 (got {heteroscedasticity}); 0 = same noise for every item",
        )
        _check(slate_size >= 0, f"simulator slate_size must be >= 0 (got {slate_size}); 0 turns slates off")
        _check(slate_boost >= 0, f"simulator slate_boost must be >= 0 (got {slate_boost})")
        if candidates is not None:
            _check(
                1 <= candidates <= n_items,
                f"simulator candidates must be between 1 and n_items={n_items} (got {candidates}); use null for the whole catalog",
            )
            if candidates == n_items:
                candidates = None  # exposure to everything is the exact mode
        self.n_users, self.n_items, self.latent_dim = int(n_users), int(n_items), int(latent_dim)
        self.reward_scale, self.quality_mean, self.quality_std = reward_scale, quality_mean, quality_std
        self.popularity_weight, self.taste_weight = popularity_weight, taste_weight
        self.sequential_weight, self.promotion_weight = sequential_weight, promotion_weight
        self.behavior_temperature = behavior_temperature
        self.slate_size, self.slate_boost = int(slate_size), float(slate_boost)
        self.candidates = candidates
        self.noise_std, self.heteroscedasticity, self.round_to_stars = noise_std, heteroscedasticity, round_to_stars
        self.seed = int(seed)

        g = _generator(self.seed, _STREAM_WORLD)
        # Coordinates with variance 1/sqrt(d): taste <x_u, v_i> and similarity <v_j, v_i> have variance 1.
        scale = self.latent_dim ** -0.25
        self.user_factors = torch.randn(self.n_users, self.latent_dim, generator=g) * scale  # [U, d]
        self.item_factors = torch.randn(self.n_items, self.latent_dim, generator=g) * scale  # [I, d]
        self.quality = quality_mean + quality_std * torch.randn(self.n_items, generator=g)  # [I]
        rank = torch.randperm(self.n_items, generator=g) + 1  # popularity rank, 1 = most popular
        self.log_popularity = -torch.log(rank.double()).float()  # [I], Zipf(1): std ~1 like the other terms
        self.rarity = (rank - 1).float() / max(1, self.n_items - 1)  # [I], 0 = most popular, 1 = rarest
        self.promotion = torch.randn(self.n_items, generator=g)  # [I], independent of taste and quality
        # Item part of the behaviour logits, already divided by the temperature.
        self._item_logit = (popularity_weight * self.log_popularity + promotion_weight * self.promotion) / behavior_temperature

    # ----------------------------------------------------------------------------------- reward
    def true_reward(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """``r*`` in [1, 5]: ``[B]`` users x all items -> ``[B, I]``, or x items ``[K]`` -> ``[B, K]``."""
        items = torch.arange(self.n_items) if items is None else items.to("cpu")
        taste = _take(self.user_factors, users.cpu()) @ _take(self.item_factors, items).T  # [B, K]
        return self._squash(taste, _take(self.quality, items))

    def pair_reward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``r*(users[n], items[n])`` for aligned ``[N]`` users and items -> ``[N]``."""
        taste = (_take(self.user_factors, users) * _take(self.item_factors, items)).sum(-1)
        return self._squash(taste, _take(self.quality, items))

    def _squash(self, taste: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        return RATING_MIN + (RATING_MAX - RATING_MIN) * torch.sigmoid(self.reward_scale * taste + quality)

    # ----------------------------------------------------------------------------------- ratings
    def noise_scale(self, items: torch.Tensor) -> torch.Tensor:
        """Per-item noise std: ``noise_std * (1 + heteroscedasticity * rarity)``, rarity in [0, 1]."""
        return self.noise_std * (1.0 + self.heteroscedasticity * _take(self.rarity, items))

    def observe(self, r_star: torch.Tensor, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Observed ratings: ``r* + noise``, rounded to stars if configured, clipped to [1, 5]."""
        rating = r_star + self.noise_scale(items) * torch.randn(r_star.shape, generator=generator)
        if self.round_to_stars:
            rating = torch.round(rating)
        return rating.clamp(RATING_MIN, RATING_MAX)

    # ----------------------------------------------------------------------------------- behaviour
    def pools(self, users: torch.Tensor) -> torch.Tensor | None:
        """Items each user is exposed to ``[B, candidates]`` (sorted by draw), or ``None`` (everything).

        A uniformly random subset per user: the first ``candidates`` distinct values of a hashed
        stream, which is exactly sampling without replacement.
        """
        if self.candidates is None:
            return None
        users = users.cpu().long()
        c, draws = self.candidates, self.candidates + max(64, self.candidates // 4)
        while True:
            j = torch.arange(draws)
            vals = _hash(self.seed, _TAG_POOL, users[:, None], j[None, :]) % self.n_items  # [B, M]
            svals, pos = vals.sort(dim=1, stable=True)
            first = torch.ones_like(svals, dtype=torch.bool)
            first[:, 1:] = svals[:, 1:] != svals[:, :-1]
            if int(first.sum(1).min()) >= c:
                key = torch.where(first, pos, pos + draws)  # first occurrences in draw order, then repeats
                keep = key.argsort(dim=1)[:, :c]
                return svals.gather(1, keep)  # [B, C]
            draws *= 2

    def slates(self, users: torch.Tensor, steps: torch.Tensor, width: int) -> torch.Tensor:
        """Slate positions ``[B, S]`` in ``0..width-1`` (the pool's, or the catalog's) for each visit."""
        j = torch.arange(self.slate_size)
        return _hash(self.seed, _TAG_SLATE, users.cpu()[:, None], steps.cpu()[:, None], j[None, :]) % width

    def _static_logits(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Popularity + promotion + taste, over all items ``[B, I]`` or per-user items ``[B, C]``."""
        x = _take(self.user_factors, users)  # [B, d]
        w = self.taste_weight / self.behavior_temperature
        if items is None:
            return self._item_logit[None, :] + w * (x @ self.item_factors.T)
        taste = torch.bmm(_take(self.item_factors, items), x[:, :, None]).squeeze(-1)  # [B, C]
        return _take(self._item_logit, items) + w * taste

    def behavior_logits(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Logits of ``pi_beta(. | user, history)`` over all world items ``[B, n_items]``.

        ``history [B, H]``: world item ids in chronological order, ``-1`` for padding (left or right).
        The step (visit) index is the number of history items; the last one drives the sequential
        term. Items of the history and items outside the user's exposure set are ``-inf``.
        """
        users, history = users.cpu().long(), history.cpu().long()
        B, H = history.shape
        logits = self._static_logits(users)  # [B, I]
        valid = history >= 0  # [B, H]
        step = valid.sum(1)  # [B]
        if H and self.sequential_weight > 0:
            last_pos = (valid.long() * torch.arange(1, H + 1)).argmax(1)  # newest valid entry
            last = history.gather(1, last_pos[:, None]).squeeze(1).clamp(min=0)  # [B]
            sim = _take(self.item_factors, last) @ self.item_factors.T  # [B, I]
            logits = logits + (self.sequential_weight / self.behavior_temperature) * sim * (step > 0)[:, None]
        pools = self.pools(users)
        if self.slate_size and self.slate_boost:
            slots = self.slates(users, step, self.candidates or self.n_items)
            slate = pools.gather(1, slots) if pools is not None else slots  # [B, S] world ids
            logits.scatter_(1, slate, logits.gather(1, slate) + self.slate_boost)
        if pools is not None:
            exposed = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, pools, True)
            logits = logits.masked_fill(~exposed, float("-inf"))
        rows = torch.arange(B)[:, None].expand(B, H)
        logits[rows[valid], history[valid]] = float("-inf")
        return logits

    def behavior_probs(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """``pi_beta(. | user, history)`` ``[B, n_items]``."""
        return torch.softmax(self.behavior_logits(users, history), dim=-1)

    # ----------------------------------------------------------------------------------- sequences
    def block_size(self) -> int:
        """Users per generation block: a function of the world's sizes only (so results are too)."""
        per_user = (self.candidates * (self.latent_dim + 4)) if self.candidates else self.n_items
        return max(1, min(4096, _BLOCK_ELEMENTS // per_user))

    def sample_sequences(self, users: torch.Tensor, lengths: torch.Tensor, block: int) -> torch.Tensor:
        """Sequences drawn from ``pi_beta`` without replacement: ``[B, max(lengths)]`` item ids, ``-1`` pad.

        ``block`` selects the random stream, so equal (seed, block, users, lengths) give equal output.
        """
        gen = _generator(self.seed, _STREAM_CHOICES, block)
        order = lengths.argsort(descending=True, stable=True)  # active users form a prefix at each step
        users_s, len_s = users[order], lengths[order]
        B, L = len(users), int(len_s.max()) if len(users) else 0
        n_active = (len_s[None, :] > torch.arange(L)[:, None]).sum(1).tolist()  # [L]
        pools = self.pools(users_s)
        if pools is None:
            static = self._static_logits(users_s)  # [B, I]
        else:
            pool_factors = _take(self.item_factors, pools)  # [B, C, d]
            static = self._static_logits(users_s, pools)  # [B, C]
        width = static.shape[1]
        w_seq = self.sequential_weight / self.behavior_temperature
        out = torch.full((B, L), -1, dtype=torch.long)
        last = torch.zeros(B, dtype=torch.long)
        for t in range(L):
            n = n_active[t]
            rows = torch.arange(n)
            if t > 0 and w_seq > 0:
                v_last = _take(self.item_factors, last[:n])  # [n, d]
                if pools is None:
                    logits = torch.addmm(static[:n], v_last, self.item_factors.T, alpha=w_seq)  # [n, I]
                else:
                    logits = torch.baddbmm(static[:n, :, None], pool_factors[:n], v_last[:, :, None], alpha=w_seq).squeeze(-1)
            else:
                logits = static[:n].clone()
            if self.slate_size and self.slate_boost:
                slots = self.slates(users_s[:n], torch.full((n,), t), width)  # [n, S]
                logits.scatter_(1, slots, logits.gather(1, slots) + self.slate_boost)
            choice = _sample_categorical(logits, gen)  # [n] positions in the catalog or the pool
            static[rows, choice] = float("-inf")  # without replacement
            item = choice if pools is None else pools.gather(1, choice[:, None]).squeeze(1)
            out[:n, t] = item
            last[:n] = item
        result = torch.empty_like(out)
        result[order] = out
        return result


class Simulator(Source):
    """Synthetic sequential data with known true rewards and behaviour policy (the default data).

    Each user's sequence is sampled from ``pi_beta``; ``timestamp`` is the step index. Use it through
    ``RecDataModule`` like any source; the DataModule also gets :meth:`ground_truth` from it, which
    adds ``true_reward@10``, ``true_ndcg@10``, ``regret@10``, ``true_reward_sampled``,
    ``true_reward@10_behavior`` and ``true_reward@10_oracle`` to every validation and test run.
    See ``docs/simulator.md``.

    Args:
        n_users: number of users (sequences).
        n_items: items in the world (up to ~10^6); items nobody consumed never reach the catalog.
        min_seq_len: shortest sequence (>= 3: a training item, a validation and a test target).
        max_seq_len: longest sequence; lengths are uniform in ``[min_seq_len, max_seq_len]``.
        latent_dim: size of the user and item factors.
        reward_scale: how strongly taste ``<x_u, v_i>`` moves ``r*`` (0: only item quality matters).
        quality_mean: mean item quality (logit offset of ``r*``; 0 puts the catalog's mean ``r*`` near 3).
        quality_std: spread of item quality, a part of ``r*`` that ``pi_beta`` does not see.
        popularity_weight: share of the behaviour mixture driven by item popularity (Zipf).
        taste_weight: share driven by taste ``<x_u, v_i>`` (the only term aligned with ``r*``).
        sequential_weight: share driven by similarity ``<v_last, v_i>`` to the previous item.
        promotion_weight: share driven by a per-item promotion score, independent of taste/quality.
        behavior_temperature: divides the mixture: lower = more deterministic choices.
        slate_size: items promoted on the user's screen at each visit (0 = off), drawn at random per
            (user, step): pressure no history can predict.
        slate_boost: logit added to the slate's items (``exp(boost)`` times more likely).
        candidates: items each user is exposed to (a random subset; ``null`` = whole catalog, exact).
            Set it for large catalogs: cost becomes ``interactions x candidates``.
        noise_std: std of the Gaussian noise on observed ratings (0 = noiseless).
        heteroscedasticity: noise std grows to ``noise_std * (1 + this)`` for the rarest items.
        round_to_stars: round observed ratings to whole stars (1..5), like real rating data.
        seed: everything (world, sequences, noise) is a deterministic function of the knobs and this.
    """

    rating_range = (RATING_MIN, RATING_MAX)

    def __init__(
        self,
        n_users: int = 2000,
        n_items: int = 1000,
        min_seq_len: int = 20,
        max_seq_len: int = 60,
        latent_dim: int = 8,
        reward_scale: float = 1.5,
        quality_mean: float = 0.0,
        quality_std: float = 1.25,
        popularity_weight: float = 0.2,
        taste_weight: float = 0.4,
        sequential_weight: float = 0.2,
        promotion_weight: float = 0.2,
        behavior_temperature: float = 0.3,
        slate_size: int = 10,
        slate_boost: float = 5.0,
        candidates: int | None = None,
        noise_std: float = 0.5,
        heteroscedasticity: float = 0.0,
        round_to_stars: bool = True,
        seed: int = 0,
    ) -> None:
        _check(
            int(min_seq_len) == min_seq_len and min_seq_len >= 3,
            f"simulator min_seq_len must be an integer >= 3 (got {min_seq_len}): each user needs a training item, "
            "a validation and a test target",
        )
        _check(max_seq_len >= min_seq_len, f"simulator max_seq_len ({max_seq_len}) must be >= min_seq_len ({min_seq_len})")
        self.knobs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        world = {k: v for k, v in self.knobs.items() if k not in ("min_seq_len", "max_seq_len")}
        self.world = SimWorld(**world)
        reachable = self.world.candidates or self.world.n_items
        what, knob = ("candidates per user", "candidates") if self.world.candidates else ("catalog", "n_items")
        _check(
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
        return {"source": "simulator", "version": WORLD_VERSION, **self.knobs}

    # ----------------------------------------------------------------------------------- delegation
    def true_reward(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """``r*`` for world users ``[B]`` over all world items (or ``items [K]``): ``[B, I|K]``."""
        return self.world.true_reward(users, items)

    def behavior_logits(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Logits of ``pi_beta`` over all world items ``[B, n_items]`` (world ids, ``-1`` = pad)."""
        return self.world.behavior_logits(users, history)

    # ----------------------------------------------------------------------------------- generation
    def generate(self) -> dict[str, torch.Tensor]:
        """All interactions, user-major and chronological: ``user, item, step, r_star, rating`` ``[N]``.

        Users are processed in blocks of ``world.block_size()``; each block has its own random
        streams, so the result depends on the seed and the knobs only.
        """
        w = self.world
        lengths = torch.randint(
            self.min_seq_len, self.max_seq_len + 1, (w.n_users,), generator=_generator(w.seed, _STREAM_LENGTHS)
        )
        size = w.block_size()
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("user", "item", "step", "r_star", "rating")}
        for block, start in enumerate(range(0, w.n_users, size)):
            users = torch.arange(start, min(start + size, w.n_users))
            seqs = w.sample_sequences(users, lengths[users], block)  # [b, L]
            valid = seqs >= 0
            user = users[:, None].expand_as(seqs)[valid]  # row-major: user-major, then step
            item = seqs[valid]
            step = torch.arange(seqs.shape[1])[None, :].expand_as(seqs)[valid]
            r_star = w.pair_reward(user, item)
            rating = w.observe(r_star, item, _generator(w.seed, _STREAM_NOISE, block))
            for k, v in zip(parts, (user, item, step, r_star, rating)):
                parts[k].append(v)
        return {k: torch.cat(v) for k, v in parts.items()}

    def load(self) -> pa.Table:
        data = self.generate()
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
        return SimulatorTruth(self.world, data)


class SimulatorTruth:
    """Ground-truth metrics of any policy's catalog scores, per evaluated user.

    Everything is restricted to the model's catalog (items somebody consumed; items never consumed
    have no internal id), and to items the user has not consumed yet (``history_items``).

    - ``true_reward@10``: mean ``r*`` of the policy's top-10.
    - ``true_ndcg@10``: DCG of the policy's top-10 with gains ``r* - 1`` (a 1-star item adds nothing),
      over the DCG of the ideal top-10 of unconsumed catalog items.
    - ``regret@10``: ``true_reward@10_oracle - true_reward@10``.
    - ``true_reward_sampled``: expected ``r*`` of one item drawn from ``softmax(scores)``.
    - ``true_reward@10_behavior``: mean ``r*`` of ``pi_beta``'s 10 most probable items after the same
      history (its visit slate included).
    - ``true_reward@10_oracle``: mean ``r*`` of the 10 best unconsumed catalog items.
    """

    metric_names = (
        "true_reward@10", "true_ndcg@10", "regret@10", "true_reward_sampled",
        "true_reward@10_behavior", "true_reward@10_oracle",
    )

    def __init__(self, world: SimWorld, data: Interactions) -> None:
        self.world = world
        items = data.item_ids.data.table.column("item_id")
        users = data.user_ids.data.table.column("user_id")
        # internal item j (1..n_items) -> world item; slot 0 (padding) -> -1
        self.world_item = torch.from_numpy(
            np.concatenate([[-1], pc.cast(items, pa.int64()).to_numpy()]).astype(np.int64)
        )  # [n_items + 1]
        self.world_user = torch.from_numpy(pc.cast(users, pa.int64()).to_numpy().astype(np.int64))  # [n_users]
        self.n_items = data.n_items
        k = torch.arange(TOP_K, dtype=torch.float32)
        self._discount = 1.0 / torch.log2(k + 2.0)  # [10]

    def evaluate(self, batch: dict[str, torch.Tensor], scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-user ground-truth metrics ``name -> [B]`` for ``scores [B, n_items + 1]`` (fp32)."""
        device = scores.device
        B = scores.shape[0]
        rows = max(1, _BLOCK_ELEMENTS // max(1, self.world.n_items))
        parts = [self._evaluate(
            batch["user_index"][s:s + rows].cpu(), batch["history_items"][s:s + rows].cpu(), scores[s:s + rows].float().cpu()
        ) for s in range(0, B, rows)]
        return {name: torch.cat([p[name] for p in parts]).to(device) for name in self.metric_names}

    def _evaluate(self, user_index: torch.Tensor, history: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        B = scores.shape[0]
        k = min(TOP_K, self.n_items)
        users = _take(self.world_user, user_index)  # [B] world users
        catalog = self.world_item[1:]  # [n] world items of internal 1..n
        r = torch.empty(B, self.n_items + 1)
        r[:, 0] = RATING_MIN
        r[:, 1:] = self.world.true_reward(users, catalog)  # [B, n + 1]
        unconsumed = torch.ones(B, self.n_items + 1, dtype=torch.bool)
        unconsumed[:, 0] = False
        unconsumed.scatter_(1, history, False)
        unconsumed[:, 0] = False  # padding entries of the history scattered onto column 0

        top = scores.topk(k, dim=1).indices  # [B, k]
        r_top = r.gather(1, top)  # [B, k]
        ideal = r.masked_fill(~unconsumed, float("-inf")).topk(k, dim=1).values  # [B, k]
        discount = self._discount[:k]
        dcg = ((r_top - RATING_MIN) * discount).sum(1)
        idcg = ((ideal - RATING_MIN) * discount).sum(1)

        probs = torch.softmax(scores, dim=1)  # -inf (masked) entries get 0
        world_history = _take(self.world_item, history)  # [B, H], -1 where padding
        behaviour = self.world.behavior_logits(users, world_history)[:, catalog]  # [B, n]
        behaviour = torch.cat([torch.full((B, 1), float("-inf")), behaviour], dim=1)
        behaviour = behaviour.masked_fill(~unconsumed, float("-inf"))
        r_beh = r.gather(1, behaviour.topk(k, dim=1).indices)

        policy, oracle = r_top.mean(1), ideal.mean(1)
        return {
            "true_reward@10": policy,
            "true_ndcg@10": dcg / idcg.clamp(min=1e-12),
            "regret@10": oracle - policy,
            "true_reward_sampled": (probs * r).sum(1),
            "true_reward@10_behavior": r_beh.mean(1),
            "true_reward@10_oracle": oracle,
        }


class BanditWorld:
    """The one-step (contextual bandit) view of the simulator, as in the paper's theory.

    Context ``c`` is world user ``c`` with a fixed short history drawn from ``pi_beta``; the actions are
    the world's ``A`` items. Everything is an explicit ``[C, A]`` tensor: ``pi_beta``, ``true_reward``
    and the analytic target ``pi*_lambda ∝ pi_beta * exp(r* / lambda)`` (Proposition 4.1), so a
    trained policy can be compared with the theory exactly. It does not go through the DataModule:
    build it directly, draw logs with :meth:`sample_logs`, fit a policy ``[C, A]`` on them, and score
    it with :meth:`kl_to_target` and :meth:`value`.

    Args:
        n_contexts: contexts ``C`` (users).
        n_actions: actions ``A`` (items).
        history_len: items in each context's fixed history (excluded from its actions).
        seed: world seed.
        behavior_temperature: softer than the sequential default (0.3), so that every action is
            logged often enough for a tabular policy to be checked against the target with a few
            thousand logs per context.
        slate_size: 0: a one-step world has no sequence of visits; a fixed slate per context would
            only be a constant boost on a few of the ``A`` actions.
        world: any other :class:`Simulator` world knob (``noise_std``, ``taste_weight``, ...).
    """

    def __init__(
        self,
        n_contexts: int = 64,
        n_actions: int = 50,
        history_len: int = 3,
        seed: int = 0,
        behavior_temperature: float = 0.5,
        slate_size: int = 0,
        **world: Any,
    ) -> None:
        _check(history_len >= 0, f"bandit history_len must be >= 0 (got {history_len})")
        _check(
            history_len < n_actions,
            f"bandit history_len={history_len} leaves no action among n_actions={n_actions}; lower history_len",
        )
        self.world = SimWorld(
            n_users=n_contexts, n_items=n_actions, seed=seed, behavior_temperature=behavior_temperature,
            slate_size=slate_size, **world,
        )
        users = torch.arange(n_contexts)
        self.history = self.world.sample_sequences(users, torch.full((n_contexts,), history_len), block=0)  # [C, h]
        self.log_pi_beta = torch.log_softmax(self.world.behavior_logits(users, self.history), dim=-1)  # [C, A]
        self.pi_beta = self.log_pi_beta.exp()
        self.true_reward = self.world.true_reward(users)  # [C, A]

    @property
    def n_contexts(self) -> int:
        return self.pi_beta.shape[0]

    @property
    def n_actions(self) -> int:
        return self.pi_beta.shape[1]

    def sample_logs(self, n_per_context: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logged ``(context [N], action [N], observed_reward [N])``, ``N = C * n_per_context``, actions from ``pi_beta``."""
        context = torch.arange(self.n_contexts).repeat_interleave(n_per_context)
        action = torch.multinomial(self.pi_beta, n_per_context, replacement=True, generator=generator).flatten()
        reward = self.world.observe(self.true_reward[context, action], action, generator)
        return context, action, reward

    def target_log_probs(self, lam: float) -> torch.Tensor:
        """``log pi*_lambda`` ``[C, A]``, normalised in log space (stable for tiny lambda)."""
        _check(lam > 0, f"lambda must be > 0 (got {lam}); small lambda concentrates on the best actions")
        return torch.log_softmax(self.log_pi_beta.double() + self.true_reward.double() / lam, dim=-1).float()

    def target(self, lam: float) -> torch.Tensor:
        """``pi*_lambda ∝ pi_beta * exp(r* / lambda)`` ``[C, A]``."""
        return self.target_log_probs(lam).exp()

    def kl_to_target(self, policy_log_probs: torch.Tensor, lam: float) -> float:
        """Mean over contexts of ``KL(pi*_lambda || pi_theta)`` for ``policy_log_probs [C, A]``."""
        log_p = self.target_log_probs(lam).double()
        p = log_p.exp()
        diff = torch.where(p > 0, log_p - policy_log_probs.double(), torch.zeros_like(log_p))
        return float((p * diff).sum(-1).mean())

    def value(self, policy_probs: torch.Tensor) -> float:
        """Expected true reward of a policy ``[C, A]``, averaged over contexts."""
        return float((policy_probs.double() * self.true_reward.double()).sum(-1).mean())
