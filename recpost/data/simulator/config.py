"""The settings of a simulated world, defined once: fields, defaults, documentation and validation.

:class:`WorldConfig` is what :class:`~recpost.data.simulator.SimWorld` is built from, what the
``Simulator`` source takes as its ``world`` argument (a nested ``world:`` group in YAML, which
jsonargparse fills from these fields and their docs) and what ``BanditWorld`` builds from its
keywords, so a new setting or a changed default is written here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from recpost.errors import RecpostError


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
        seed: everything (world, sequences, noise) is a deterministic function of the settings and this.
    """

    n_users: int = 2000
    n_items: int = 1000
    latent_dim: int = 8
    reward_scale: float = 1.5
    quality_mean: float = 0.0
    quality_std: float = 1.25
    popularity_weight: float = 0.2
    taste_weight: float = 0.4
    sequential_weight: float = 0.2
    promotion_weight: float = 0.2
    behavior_temperature: float = 0.3
    slate_size: int = 10
    slate_boost: float = 5.0
    candidates: int | None = None
    noise_std: float = 0.5
    heteroscedasticity: float = 0.0
    round_to_stars: bool = True
    seed: int = 0

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
        check(self.slate_size >= 0, f"simulator slate_size must be >= 0 (got {self.slate_size}); 0 turns slates off")
        check(self.slate_boost >= 0, f"simulator slate_boost must be >= 0 (got {self.slate_boost})")
        if self.candidates is not None:
            check(
                1 <= self.candidates <= self.n_items,
                f"simulator candidates must be between 1 and n_items={self.n_items} (got {self.candidates}); use null "
                "for the whole catalog",
            )
