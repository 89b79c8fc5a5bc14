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
  rounded to stars, clipped to 1..5. Methods train on observed ratings; ``r*`` is for evaluation;
- knobs that make a learned reward model unreliable the way real ones are, all off by default:
  ``exposure_concentration`` (a rarely shown long tail), heteroscedastic noise by exposure
  (``rarity_from``), sparse feedback (``feedback_rate``), a placebo (``shuffle_ratings``) and terms of
  ``r*`` a bilinear model fits badly (``taste_interaction``, ``satiation``); see ``WorldConfig``.

Three entry points:

- :class:`Simulator` is a data ``Source`` (sequential mode): users' sequences sampled from
  ``pi_beta``; ``load()`` returns the canonical table and ``ground_truth(data)`` the evaluator that
  the DataModule hands to every method (``true_reward@10``, ``regret@10``, ...).
- :class:`BanditWorld` is the one-step (contextual bandit) view of the same world, for checking
  exponential reward-weighted SFT against ``pi*_lambda ∝ pi_beta * exp(r*/lambda)``.
- :class:`SimWorld` holds the world itself (factors, ``true_reward``, ``behavior_logits``,
  ``observe``) and is shared by both; it is built from a :class:`WorldConfig`, the one definition
  of the world's settings, their defaults and their validation.

Modules: ``config`` (:class:`WorldConfig`), ``rng`` (counter-based hashes, random streams,
categorical draws), ``world`` (:class:`SimWorld`), ``source`` (:class:`Simulator`), ``truth``
(:class:`SimulatorTruth`) and ``bandit`` (:class:`BanditWorld`). They import each other by module,
never through this ``__init__``, which only re-exports the public names: no import cycle.

Scale. Generation is vectorised in torch: users are processed in blocks whose size keeps each block's
working memory near ``world.BLOCK_ELEMENTS`` floats, with a Python loop over sequence steps only. Items
are drawn without replacement from the softmax by inverse CDF, with consumed entries set to
``-inf``. With ``candidates: null`` each step scores the whole catalog (exact, cost
``interactions x n_items``: fine up to ~10^4-10^5 items). For large catalogs set ``candidates``: each
user is then exposed to a fixed, uniformly random subset of that many items (a retrieval stage),
and ``pi_beta`` is the same softmax restricted to that subset, so relative preferences among exposed
items are unchanged and the cost is ``interactions x candidates``. Exposure sets and slates are
counter-based hashes of ``(seed, user, step)``, so ``pi_beta`` can be recomputed for any history
without storing them. Everything is deterministic per seed.
"""

from recpost.data.simulator.bandit import BanditWorld
from recpost.data.simulator.config import WorldConfig
from recpost.data.simulator.source import WORLD_VERSION, Simulator
from recpost.data.simulator.truth import SimulatorTruth
from recpost.data.simulator.world import SimWorld

__all__ = ["WORLD_VERSION", "BanditWorld", "SimWorld", "Simulator", "SimulatorTruth", "WorldConfig"]
