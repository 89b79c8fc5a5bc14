"""The settings of a simulated world, defined once: fields, defaults, documentation and validation.

:class:`WorldConfig` is what :class:`~recpost.data.simulator.SimWorld` is built from, what the
``Simulator`` source takes as its ``world`` argument (a nested ``world:`` group in YAML, which
jsonargparse fills from these fields and their docs) and what ``BanditWorld`` builds from its
keywords, so a new setting or a changed default is written here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from recpost.core.errors import RecpostError


def check(ok: bool, message: str) -> None:
    """Raise the one-line user error ``message`` unless ``ok``."""
    if not ok:
        raise RecpostError(message)


@dataclass(frozen=True)
class WorldConfig:
    """Users, items, true reward, behaviour policy and rating noise of a simulated world.

    Frozen, so the default instance in ``Simulator``'s signature can be shared safely. Values are
    checked by :meth:`validate` when a world is built from them (not here), so a bad value fails
    where it is used, after the sequence-length checks of the ``Simulator``, as it always did.

    Args:
        n_users: number of users (sequences).
        n_items: items in the world (up to ~10^6); items nobody consumed never reach the catalog.
        latent_dim: size of the user and item factors.
        reward_scale: how strongly taste ``<x_u, v_i>`` moves ``r*`` (0: only item quality matters).
        quality_mean: mean item quality (logit offset of ``r*``; 0 puts the catalog's mean ``r*`` near 3).
        quality_std: spread of item quality, a part of ``r*`` that ``pi_beta`` does not see.
        taste_interaction: weight of an interaction term in ``r*``'s logit: the product of the two
            halves of the taste, ``<x_u, v_i>`` over the first ``latent_dim // 2`` coordinates times
            over the rest, scaled to unit variance (an item pleases more when it fits, or misfits,
            both halves of a user's taste alike). It raises the rank of the ``r*`` logit matrix from
            ``latent_dim + 1`` to ``latent_dim + 1 + h (latent_dim - h)`` (``h = latent_dim // 2``),
            so a reward model's low-rank head (state . item embedding) must learn the products of
            factors to fit it: misspecification of a bilinear model (0 = off).
        satiation: how much an item's genre (its largest latent coordinate) wears off: ``r*``'s logit
            drops by ``satiation`` times the share of the last ``satiation_window`` consumed items that
            had that genre (a whole window of one genre: ``-satiation``). A sequence effect, so ``r*``
            depends on the history, which ``pi_beta`` ignores (it keeps binging similar items) and a
            reward model must read from the sequence (0 = off).
        satiation_window: how many of the latest consumed items satiation looks back on.
        popularity_weight: share of the behaviour mixture driven by item popularity (Zipf).
        taste_weight: share driven by taste ``<x_u, v_i>`` (the only term aligned with ``r*``).
        sequential_weight: share driven by similarity ``<v_last, v_i>`` to the previous item.
        promotion_weight: share driven by a per-item promotion score, independent of taste/quality.
        behavior_temperature: divides the mixture: lower = more deterministic choices.
        exposure_concentration: extra logit ``exposure_concentration * log popularity_i`` outside the
            mixture: the platform shows items in proportion to ``popularity^this``, so the long tail is
            rarely shown and rarely rated (0 = off).
        slate_size: items promoted on the user's screen at each visit (0 = off), drawn at random per
            (user, step): pressure no history can predict.
        slate_boost: logit added to the slate's items (``exp(boost)`` times more likely).
        candidates: items each user is exposed to (a random subset; ``null`` = whole catalog, exact).
            Set it for large catalogs: cost becomes ``interactions x candidates``.
        noise_std: std of the Gaussian noise on observed ratings (0 = noiseless).
        heteroscedasticity: noise std grows to ``noise_std * (1 + this)`` for the rarest items.
        rarity_from: what makes an item rare for the heteroscedastic noise: its ``popularity`` rank
            alone, or its expected ``exposure`` under ``pi_beta`` (popularity, promotion, exposure
            concentration and the taste term averaged over users), which follows how often the
            item is actually consumed much more closely.
        round_to_stars: round observed ratings to whole stars (1..5), like real rating data.
        feedback_rate: share of consumptions that carry a rating (1 = all). Unrated consumptions are
            left out of the logged table (``load()``): the log holds rated consumptions only, as
            MovieLens does; ``generate()`` still returns every consumption with its ``rated`` flag.
        shuffle_ratings: placebo world: observed ratings are permuted across interactions, so they
            keep their distribution and lose any link to ``r*`` (any "gain" of a reward-weighted
            method over SFT must then vanish).
        seed: everything (world, sequences, noise) is a deterministic function of the settings and this.
    """

    n_users: int = 2000
    n_items: int = 1000
    latent_dim: int = 8
    reward_scale: float = 1.5
    quality_mean: float = 0.0
    quality_std: float = 1.25
    taste_interaction: float = 0.0
    satiation: float = 0.0
    satiation_window: int = 5
    popularity_weight: float = 0.2
    taste_weight: float = 0.4
    sequential_weight: float = 0.2
    promotion_weight: float = 0.2
    behavior_temperature: float = 0.3
    exposure_concentration: float = 0.0
    slate_size: int = 10
    slate_boost: float = 5.0
    candidates: int | None = None
    noise_std: float = 0.5
    heteroscedasticity: float = 0.0
    rarity_from: Literal["popularity", "exposure"] = "popularity"
    round_to_stars: bool = True
    feedback_rate: float = 1.0
    shuffle_ratings: bool = False
    seed: int = 0

    def changed_from_default(self, names: tuple[str, ...]) -> dict:
        """Those of the settings ``names`` whose value is not the default, in field order (the cache
        key of a world names a later setting only when it is set, so older worlds keep their key)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in names and getattr(self, f.name) != f.default}

    def validate(self) -> None:
        """One-line ``RecpostError`` naming the first bad setting and how to fix it."""
        for name in ("n_users", "n_items", "latent_dim"):
            value = getattr(self, name)
            check(
                int(value) == value and value >= 1,
                f"simulator {name} must be a positive integer (got {value}); set it to >= 1",
            )
        weights = {
            "popularity_weight": self.popularity_weight, "taste_weight": self.taste_weight,
            "sequential_weight": self.sequential_weight, "promotion_weight": self.promotion_weight,
        }
        negative = {k: v for k, v in weights.items() if v < 0}
        check(
            not negative,
            f"simulator behaviour weights must be >= 0, got {negative}; they are shares of the behaviour mixture",
        )
        total = sum(weights.values())
        check(
            math.isclose(total, 1.0, abs_tol=1e-6),
            f"simulator behaviour weights (popularity, taste, sequential, promotion) must sum to 1, they sum to "
            f"{total:g}; rescale them (behavior_temperature sets how sharp the choice is)",
        )
        check(self.behavior_temperature > 0, f"simulator behavior_temperature must be > 0 (got {self.behavior_temperature})")
        check(self.reward_scale >= 0, f"simulator reward_scale must be >= 0 (got {self.reward_scale})")
        check(self.quality_std >= 0, f"simulator quality_std must be >= 0 (got {self.quality_std})")
        check(self.noise_std >= 0, f"simulator noise_std must be >= 0 (got {self.noise_std}); use 0 for noiseless ratings")
        check(
            self.heteroscedasticity >= 0,
            f"simulator heteroscedasticity must be >= 0 (got {self.heteroscedasticity}); 0 = same noise for every item",
        )
        check(
            self.rarity_from in ("popularity", "exposure"),
            f"simulator rarity_from must be 'popularity' or 'exposure' (got {self.rarity_from!r})",
        )
        check(self.exposure_concentration >= 0, f"simulator exposure_concentration must be >= 0 (got "
              f"{self.exposure_concentration}); 0 = exposure as the behaviour mixture gives it")
        check(
            0 < self.feedback_rate <= 1,
            f"simulator feedback_rate must be in (0, 1] (got {self.feedback_rate}); it is the share of consumptions "
            "that carry a rating",
        )
        check(self.satiation >= 0, f"simulator satiation must be >= 0 (got {self.satiation}); 0 turns it off")
        check(
            int(self.satiation_window) == self.satiation_window and self.satiation_window >= 1,
            f"simulator satiation_window must be a positive integer (got {self.satiation_window})",
        )
        check(
            self.taste_interaction == 0 or self.latent_dim >= 2,
            f"simulator taste_interaction needs latent_dim >= 2 (got {self.latent_dim}): it multiplies two halves "
            "of the taste",
        )
        check(self.slate_size >= 0, f"simulator slate_size must be >= 0 (got {self.slate_size}); 0 turns slates off")
        check(self.slate_boost >= 0, f"simulator slate_boost must be >= 0 (got {self.slate_boost})")
        if self.candidates is not None:
            check(
                1 <= self.candidates <= self.n_items,
                f"simulator candidates must be between 1 and n_items={self.n_items} (got {self.candidates}); use null "
                "for the whole catalog",
            )
