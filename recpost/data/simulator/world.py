"""The simulated world itself: factors, true reward, behaviour policy and rating noise (no sequences).

Shared by the data source (``Simulator``), its ground truth (``SimulatorTruth``) and the bandit view
(``BanditWorld``), so all three agree on ``r*`` and ``pi_beta`` for the same :class:`WorldConfig`.
"""

from __future__ import annotations

import torch

from recpost.data.simulator.config import WorldConfig
from recpost.data.simulator.rng import (
    STREAM_CHOICES,
    STREAM_WORLD,
    TAG_POOL,
    TAG_SLATE,
    hash_keys,
    sample_categorical,
    stream_generator,
    take,
)

RATING_MIN, RATING_MAX = 1.0, 5.0
BLOCK_ELEMENTS = 1 << 22  # floats per block of users in generation / evaluation (16 MiB per tensor)


class SimWorld:
    """Users, items, true reward, behaviour policy and rating noise (no sequences).

    Built from a :class:`WorldConfig` (validated here, where the values are first used), whose
    settings are also exposed as attributes of the world. Item and user indices here are the world's
    own (items ``0..n_items-1``, users ``0..n_users-1``); histories use ``-1`` for padding.
    """

    def __init__(self, config: WorldConfig) -> None:
        config.validate()
        self.config = config
        candidates = config.candidates
        if candidates == config.n_items:
            candidates = None  # exposure to everything is the exact mode
        self.n_users, self.n_items, self.latent_dim = int(config.n_users), int(config.n_items), int(config.latent_dim)
        self.reward_scale, self.quality_mean, self.quality_std = config.reward_scale, config.quality_mean, config.quality_std
        self.popularity_weight, self.taste_weight = config.popularity_weight, config.taste_weight
        self.sequential_weight, self.promotion_weight = config.sequential_weight, config.promotion_weight
        self.behavior_temperature = config.behavior_temperature
        self.slate_size, self.slate_boost = int(config.slate_size), float(config.slate_boost)
        self.candidates = candidates
        self.noise_std, self.heteroscedasticity = config.noise_std, config.heteroscedasticity
        self.round_to_stars = config.round_to_stars
        self.taste_interaction, self.satiation = config.taste_interaction, config.satiation
        self.satiation_window = int(config.satiation_window)
        self.seed = int(config.seed)

        g = stream_generator(self.seed, STREAM_WORLD)
        # Coordinates with variance 1/sqrt(d): taste <x_u, v_i> and similarity <v_j, v_i> have variance 1.
        scale = self.latent_dim ** -0.25
        self.user_factors = torch.randn(self.n_users, self.latent_dim, generator=g) * scale  # [U, d]
        self.item_factors = torch.randn(self.n_items, self.latent_dim, generator=g) * scale  # [I, d]
        self.quality = self.quality_mean + self.quality_std * torch.randn(self.n_items, generator=g)  # [I]
        rank = torch.randperm(self.n_items, generator=g) + 1  # popularity rank, 1 = most popular
        self.log_popularity = -torch.log(rank.double()).float()  # [I], Zipf(1): std ~1 like the other terms
        self.promotion = torch.randn(self.n_items, generator=g)  # [I], independent of taste and quality
        # Item part of the behaviour logits, already divided by the temperature (exposure concentration,
        # the platform's own push to the head, is outside the users' mixture and is not).
        self._item_logit = (
            self.popularity_weight * self.log_popularity + self.promotion_weight * self.promotion
        ) / self.behavior_temperature
        if config.exposure_concentration:
            self._item_logit = self._item_logit + config.exposure_concentration * self.log_popularity
        rarity_rank = rank - 1 if config.rarity_from == "popularity" else self._rank_descending(self.log_exposure())
        self.rarity = rarity_rank.float() / max(1, self.n_items - 1)  # [I], 0 = most exposed, 1 = rarest
        self.genre = self.item_factors.argmax(1)  # [I]: an item's genre is its largest latent coordinate

    @staticmethod
    def _rank_descending(values: torch.Tensor) -> torch.Tensor:
        """``0`` for the largest value, ``len - 1`` for the smallest (ties by index)."""
        rank = torch.empty(len(values), dtype=torch.long)
        rank[values.argsort(descending=True, stable=True)] = torch.arange(len(values))
        return rank

    def log_exposure(self) -> torch.Tensor:
        """Log of each item's expected behaviour weight over users ``[I]``, up to a constant.

        The taste-blind item logit plus ``log E_u[exp(w <x_u, v_i>)] = w^2 s^2 |v_i|^2 / 2`` for
        Gaussian user factors (coordinate variance ``s^2``, ``w = taste_weight / temperature``):
        items with large factors are chosen more often through taste. Sequences and slates are left
        out (slates are uniform over items). In the default world its Spearman correlation with
        the items' consumption counts is 0.98, against 0.52 for the popularity rank alone.
        """
        w = self.taste_weight / self.behavior_temperature
        s2 = self.latent_dim ** -0.5
        return self._item_logit + 0.5 * w * w * s2 * self.item_factors.pow(2).sum(1)

    # ----------------------------------------------------------------------------------- reward
    def true_reward(
        self, users: torch.Tensor, items: torch.Tensor | None = None, history: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``r*`` in [1, 5]: ``[B]`` users x all items -> ``[B, I]``, or x items ``[K]`` -> ``[B, K]``.

        ``history [B, H]`` (world ids in chronological order, ``-1`` = padding) is what satiation looks
        at; ``None`` is a user who has consumed nothing yet (no satiation).
        """
        items = torch.arange(self.n_items) if items is None else items.to("cpu")
        x, v = take(self.user_factors, users.cpu()), take(self.item_factors, items)  # [B, d], [K, d]
        logit = self.reward_scale * (x @ v.T) + take(self.quality, items)  # [B, K]
        if self.taste_interaction:
            h = self.latent_dim // 2
            logit = logit + self._interaction(x[:, :h] @ v[:, :h].T, x[:, h:] @ v[:, h:].T)
        if self.satiation and history is not None:
            share = self.satiation_shares(history)  # [B, G]
            logit = logit - self.satiation * share[:, take(self.genre, items)]
        return self._squash(logit)

    def pair_reward(self, users: torch.Tensor, items: torch.Tensor, genre_share: torch.Tensor | None = None) -> torch.Tensor:
        """``r*(users[n], items[n])`` for aligned ``[N]`` users and items -> ``[N]``; ``genre_share [N]``:
        the share of the user's latest ``satiation_window`` items that had the item's genre (satiation)."""
        x, v = take(self.user_factors, users), take(self.item_factors, items)  # [N, d]
        logit = self.reward_scale * (x * v).sum(-1) + take(self.quality, items)
        if self.taste_interaction:
            h = self.latent_dim // 2
            logit = logit + self._interaction((x[:, :h] * v[:, :h]).sum(-1), (x[:, h:] * v[:, h:]).sum(-1))
        if self.satiation and genre_share is not None:
            logit = logit - self.satiation * genre_share
        return self._squash(logit)

    def _interaction(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The conjunctive term of ``r*``'s logit: ``taste_interaction`` times the product of the two halves
        of the taste, scaled to unit variance (the halves have variances ``h/d`` and ``(d-h)/d``)."""
        h = self.latent_dim // 2
        unit = self.latent_dim / (h * (self.latent_dim - h)) ** 0.5  # 1 / std(first * second)
        return self.taste_interaction * unit * first * second

    @staticmethod
    def _squash(logit: torch.Tensor) -> torch.Tensor:
        return RATING_MIN + (RATING_MAX - RATING_MIN) * torch.sigmoid(logit)

    def satiation_shares(self, history: torch.Tensor) -> torch.Tensor:
        """Share of each genre among the latest ``satiation_window`` items of each history ``[B, H] -> [B, G]``
        (``-1`` = padding, left or right; fewer items than the window still count out of the window)."""
        history = history.cpu().long()
        valid = history >= 0
        newest_first = valid.flip(1).cumsum(1).flip(1)  # [B, H]: valid items at or after each position
        recent = valid & (newest_first <= self.satiation_window)
        genres = take(self.genre, history.clamp(min=0))  # [B, H]
        counts = torch.zeros(history.shape[0], self.latent_dim).scatter_add_(1, genres, recent.float())
        return counts / self.satiation_window

    def sequence_genre_shares(self, seqs: torch.Tensor) -> torch.Tensor:
        """For each position of sequences ``[B, L]`` (``-1`` = padding at the end), the share of the
        ``satiation_window`` items before it that had its genre ``[B, L]`` (``genre_share`` of ``pair_reward``)."""
        valid = seqs >= 0
        genres = torch.where(valid, take(self.genre, seqs.clamp(min=0)), -1)  # [B, L]
        share = torch.zeros(seqs.shape, dtype=torch.float32)
        for lag in range(1, min(self.satiation_window, seqs.shape[1] - 1) + 1):
            same = (genres[:, lag:] == genres[:, :-lag]) & valid[:, :-lag] & valid[:, lag:]
            share[:, lag:] += same.float()
        return share / self.satiation_window

    # ----------------------------------------------------------------------------------- ratings
    def noise_scale(self, items: torch.Tensor) -> torch.Tensor:
        """Per-item noise std: ``noise_std * (1 + heteroscedasticity * rarity)``, rarity in [0, 1]."""
        return self.noise_std * (1.0 + self.heteroscedasticity * take(self.rarity, items))

    def observe(self, r_star: torch.Tensor, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Observed ratings: ``r* + noise``, rounded to stars if configured, clipped to [1, 5]."""
        rating = r_star + self.noise_scale(items) * torch.randn(r_star.shape, generator=generator)
        if self.round_to_stars:
            rating = torch.round(rating)
        return rating.clamp(RATING_MIN, RATING_MAX)

    def expected_rating(self, r_star: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``E[observed rating | r*]`` for aligned ``r_star`` and ``items``, in closed form (Gaussian noise,
        then rounding and clipping): what an unbiased off-policy estimate on ratings converges to, which
        rounding and clipping move away from ``r*`` near the ends of the scale (no rating shuffle)."""
        std = self.noise_scale(items).double().expand_as(r_star)
        m = r_star.double()
        if self.noise_std == 0:
            return (torch.round(m) if self.round_to_stars else m).clamp(RATING_MIN, RATING_MAX).to(r_star.dtype)
        cdf = lambda t: torch.special.ndtr((t - m) / std)  # noqa: E731 - P(r* + noise < t)
        if self.round_to_stars:  # star k is drawn when the noisy value rounds to k (1 and 5 take the tails)
            out = RATING_MIN + sum(1.0 - cdf(k + 0.5) for k in range(int(RATING_MIN), int(RATING_MAX)))
            return out.to(r_star.dtype)
        lo, hi = (RATING_MIN - m) / std, (RATING_MAX - m) / std
        pdf = lambda z: torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5  # noqa: E731
        inside = m * (torch.special.ndtr(hi) - torch.special.ndtr(lo)) + std * (pdf(lo) - pdf(hi))
        out = RATING_MIN * torch.special.ndtr(lo) + RATING_MAX * (1 - torch.special.ndtr(hi)) + inside
        return out.to(r_star.dtype)

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
            vals = hash_keys(self.seed, TAG_POOL, users[:, None], j[None, :]) % self.n_items  # [B, M]
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
        return hash_keys(self.seed, TAG_SLATE, users.cpu()[:, None], steps.cpu()[:, None], j[None, :]) % width

    def _static_logits(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Popularity + promotion + taste, over all items ``[B, I]`` or per-user items ``[B, C]``."""
        x = take(self.user_factors, users)  # [B, d]
        w = self.taste_weight / self.behavior_temperature
        if items is None:
            return self._item_logit[None, :] + w * (x @ self.item_factors.T)
        taste = torch.bmm(take(self.item_factors, items), x[:, :, None]).squeeze(-1)  # [B, C]
        return take(self._item_logit, items) + w * taste

    def behavior_logits(self, users: torch.Tensor, history: torch.Tensor, slate: bool = True) -> torch.Tensor:
        """Logits of ``pi_beta(. | user, history)`` over all world items ``[B, n_items]``.

        ``history [B, H]``: world item ids in chronological order, ``-1`` for padding (left or right).
        The step (visit) index is the number of history items; the last one drives the sequential
        term. Items of the history and items outside the user's exposure set are ``-inf``.
        ``slate=False``: the same visit without its promoted slate, i.e. the part of ``pi_beta`` a
        history can predict (the logged choices were made with the slate: their true propensities
        need ``slate=True``).
        """
        users, history = users.cpu().long(), history.cpu().long()
        B, H = history.shape
        logits = self._static_logits(users)  # [B, I]
        valid = history >= 0  # [B, H]
        step = valid.sum(1)  # [B]
        if H and self.sequential_weight > 0:
            last_pos = (valid.long() * torch.arange(1, H + 1)).argmax(1)  # newest valid entry
            last = history.gather(1, last_pos[:, None]).squeeze(1).clamp(min=0)  # [B]
            sim = take(self.item_factors, last) @ self.item_factors.T  # [B, I]
            logits = logits + (self.sequential_weight / self.behavior_temperature) * sim * (step > 0)[:, None]
        pools = self.pools(users)
        if slate and self.slate_size and self.slate_boost:
            slots = self.slates(users, step, self.candidates or self.n_items)
            slate_items = pools.gather(1, slots) if pools is not None else slots  # [B, S] world ids
            logits.scatter_(1, slate_items, logits.gather(1, slate_items) + self.slate_boost)
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
        return max(1, min(4096, BLOCK_ELEMENTS // per_user))

    def sample_sequences(self, users: torch.Tensor, lengths: torch.Tensor, block: int) -> torch.Tensor:
        """Sequences drawn from ``pi_beta`` without replacement: ``[B, max(lengths)]`` item ids, ``-1`` pad.

        ``block`` selects the random stream, so equal (seed, block, users, lengths) give equal output.
        """
        gen = stream_generator(self.seed, STREAM_CHOICES, block)
        order = lengths.argsort(descending=True, stable=True)  # active users form a prefix at each step
        users_s, len_s = users[order], lengths[order]
        B, L = len(users), int(len_s.max()) if len(users) else 0
        n_active = (len_s[None, :] > torch.arange(L)[:, None]).sum(1).tolist()  # [L]
        pools = self.pools(users_s)
        if pools is None:
            static = self._static_logits(users_s)  # [B, I]
        else:
            pool_factors = take(self.item_factors, pools)  # [B, C, d]
            static = self._static_logits(users_s, pools)  # [B, C]
        width = static.shape[1]
        w_seq = self.sequential_weight / self.behavior_temperature
        out = torch.full((B, L), -1, dtype=torch.long)
        last = torch.zeros(B, dtype=torch.long)
        for t in range(L):
            n = n_active[t]
            rows = torch.arange(n)
            if t > 0 and w_seq > 0:
                v_last = take(self.item_factors, last[:n])  # [n, d]
                if pools is None:
                    logits = torch.addmm(static[:n], v_last, self.item_factors.T, alpha=w_seq)  # [n, I]
                else:
                    logits = torch.baddbmm(static[:n, :, None], pool_factors[:n], v_last[:, :, None], alpha=w_seq).squeeze(-1)
            else:
                logits = static[:n].clone()
            if self.slate_size and self.slate_boost:
                slots = self.slates(users_s[:n], torch.full((n,), t), width)  # [n, S]
                logits.scatter_(1, slots, logits.gather(1, slots) + self.slate_boost)
            choice = sample_categorical(logits, gen)  # [n] positions in the catalog or the pool
            static[rows, choice] = float("-inf")  # without replacement
            item = choice if pools is None else pools.gather(1, choice[:, None]).squeeze(1)
            out[:n, t] = item
            last[:n] = item
        result = torch.empty_like(out)
        result[order] = out
        return result
