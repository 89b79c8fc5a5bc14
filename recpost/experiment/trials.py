"""Equal tuning budgets: ``trials`` settings per method, drawn from its search space by one rule for all.

A study with ``trials: N`` gives every post-training method a ``space:`` (each key a list of values, the
learning rate ``lr`` among them) and runs N settings of each, per seed; validation alone picks among them
(:mod:`.report`). Comparisons where one method was tuned and the others ran at defaults are how weak
baselines win (../shared/docs/fair-comparison.md), so the budget is the same number for every method, and a
method without a knob of its own (SFT) spends it on the learning rate.

The rule, for every method alike (:func:`draw_trials`):

1. The first trial is the method's current defaults (its config's values, with the study's and the method's
   overrides) on the space's keys, when the space holds that point: the setting earlier studies ran is always
   a candidate, so tuning can only add to it.
2. The other N - 1 are a Latin hypercube over the space's lists, seeded by ``trial_seed``: for each key the
   N - 1 trials fall in N - 1 equal slices of its list (in the order written, e.g. a log grid from small to
   large), one per slice, and the keys' slices are paired at random. Each key is spread over its whole range
   even with few trials, where independent random draws could bunch (four learning rates all large), and no
   combination of keys is favoured (a maximin design would favour the corners of the grid).
3. A draw that repeats a trial already chosen is drawn again; if that keeps failing (a space barely larger
   than N), the missing trials are the space's remaining points in seeded random order.

A space with exactly N points is a grid: every point is run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import product
from typing import Any

import numpy as np

from recpost.core.errors import RecpostError
from recpost.experiment.settings import override_settings

# Learning-rate key every space must hold: the knob that decides how far a method moves from its start.
LR = "lr"
# Whole redraws of the Latin hypercube before the remaining points fill in (rule 3).
REDRAWS = 100


def space_size(space: Mapping[str, list]) -> int:
    """The number of settings in ``space``: the product of its lists' lengths."""
    return math.prod(len(values) for values in space.values())


def check_space(space: Any, trials: int, where: str) -> dict[str, list]:
    """``space`` as a mapping of non-empty lists that holds ``lr`` and at least ``trials`` points; one error
    line otherwise."""
    if not isinstance(space, dict) or not space:
        raise RecpostError(f"{where}.space must map settings to lists of values, e.g. "
                           "space: {lr: [1.0e-5, 1.0e-4, 5.0e-4]}")
    for key, values in space.items():
        if not isinstance(values, list) or not values:
            raise RecpostError(f"{where}.space.{key} must be a non-empty list of values")
        text = next((v for v in values if isinstance(v, str) and _is_number(v)), None)
        if text is not None:  # YAML 1.1 reads 1e-5 (no dot) as text
            raise RecpostError(f"{where}.space.{key}: {text!r} is text to YAML, not a number; write it with a dot: "
                               f"{_yaml_float(text)}")
        if len(set(map(repr, values))) < len(values):
            raise RecpostError(f"{where}.space.{key} lists a value twice ({values}); list each once")
    if LR not in space:
        raise RecpostError(f"{where}.space has no {LR}: the learning rate is tuned for every method alike; add a log "
                           f"grid, e.g. {LR}: [1.0e-6, 1.0e-5, 1.0e-4, 5.0e-4, 1.0e-3]")
    if space_size(space) < trials:
        raise RecpostError(f"{where}.space has {space_size(space)} settings, fewer than trials: {trials}; add values "
                           f"(e.g. to {LR}) so that every method gets {trials} trials")
    return dict(space)


def draw_trials(space: Mapping[str, list], trials: int, defaults: Mapping[str, Any], seed: int = 0) -> list[dict]:
    """``trials`` distinct settings of ``space`` (key -> list of values), by the module's rule: the point of
    ``defaults`` first when the space holds it, then a seeded Latin hypercube (see the module docstring)."""
    keys = list(space)
    if space_size(space) < trials:
        raise ValueError(f"a space of {space_size(space)} settings cannot give {trials} trials")
    chosen: list[tuple[int, ...]] = []
    start = tuple(_index(space[k], defaults[k]) if k in defaults else None for k in keys)
    if None not in start:
        chosen.append(start)
    rng = np.random.default_rng(seed)
    wanted = trials - len(chosen)
    for _ in range(REDRAWS):
        if wanted == 0:
            break
        points = _latin_hypercube([len(space[k]) for k in keys], wanted, rng)
        if len(set(points)) == wanted and not set(points) & set(chosen):
            chosen += points
            wanted = 0
    if wanted:  # rule 3: a crowded space
        rest = [p for p in product(*(range(len(space[k])) for k in keys)) if p not in chosen]
        chosen += [rest[i] for i in rng.permutation(len(rest))[:wanted]]
    return [{k: space[k][i] for k, i in zip(keys, point)} for point in chosen]


def _latin_hypercube(levels: list[int], n: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """``n`` points of a grid with ``levels[k]`` values along key k: along each key, point t lies in slice t of
    ``n`` equal slices of [0, 1) (at a random place in it), the slices' order shuffled per key; a place u
    is the value at index floor(u * levels)."""
    columns = []
    for count in levels:
        places = (rng.permutation(n) + rng.random(n)) / n  # [n], one in each slice
        columns.append(np.minimum((places * count).astype(int), count - 1))
    return [tuple(int(c[t]) for c in columns) for t in range(n)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _yaml_float(text: str) -> str:
    """``1e-05`` as YAML 1.1 reads a number: ``1.0e-05``."""
    mantissa, _, exponent = f"{float(text):e}".partition("e")
    return f"{float(mantissa):.1f}e{exponent}" if "e" in text.lower() else str(float(text))


def _index(values: list, value: Any) -> int | None:
    """Position of ``value`` in ``values`` (numbers compared as numbers: YAML's 5.0e-4 is 0.0005), or None."""
    for i, candidate in enumerate(values):
        if candidate == value and isinstance(candidate, bool) == isinstance(value, bool):  # true is not 1
            return i
    return None


def assign_trials(methods: list, trials: Any, seed: Any, posttrain_overrides: list[str], where: str) -> int | None:
    """With ``trials: N``, each method's N settings (``MethodSpec.trial_settings``) drawn from its ``space``;
    without, no method may have a space. Returns N (or None). ``where``: the experiment config, for errors."""
    spaced = [m.name for m in methods if m.space is not None]
    if trials is None:
        if spaced:
            raise RecpostError(f"{where}: methods {spaced} have a space: but the study sets no trials:; add trials: N "
                               "(settings tried per method and seed, the same for every method), or use grid:")
        return None
    if not (isinstance(trials, int) and not isinstance(trials, bool) and trials >= 1):
        raise RecpostError(f"{where}: trials must be an integer >= 1 (got {trials!r})")
    if not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise RecpostError(f"{where}: trial_seed must be an integer (got {seed!r})")
    for method in methods:
        at = f"{where}: methods.{method.name}"
        if method.grid:
            raise RecpostError(f"{at}: grid: runs every point, which would give this method another budget than "
                               f"trials: {trials}; give it a space: (trials: draws {trials} settings from it)")
        if method.space is None:
            raise RecpostError(f"{at} has no space:; with trials: {trials} every method is tuned alike (SFT on the "
                               f"learning rate alone): add one, e.g. space: {{{LR}: [1.0e-5, 1.0e-4, 5.0e-4, 1.0e-3]}}")
        space = check_space(method.space, trials, at)
        method.trial_settings = draw_trials(space, trials, method_defaults(method, posttrain_overrides), seed)
    return trials


def method_defaults(method, posttrain_overrides: list[str]) -> dict[str, Any]:
    """The settings a stage of ``method`` gets without a grid point: the class's defaults, its config's
    ``model.init_args``, the study's ``posttrain_overrides``, the method's ``overrides`` (later ones win)."""
    return {**method.method_class.setting_defaults(), **method.init_args, **override_settings(posttrain_overrides),
            **override_settings(method.overrides)}


def describe_trials(methods: list, trials: int | None) -> list[str]:
    """The dry run's lines on the budget: each method's space and the trials drawn from it (none without trials)."""
    if not trials:
        return []
    lines = ["", f"trials: {trials} settings per method and seed, drawn from each method's space (the first: its "
                 "config's defaults when the space holds them); validation alone chooses among them:"]
    for method in methods:
        space = " x ".join(f"{k} [{', '.join(map(str, values))}]" for k, values in method.space.items())
        drawn = "; ".join(", ".join(f"{k}={v}" for k, v in setting.items()) for setting in method.settings())
        lines.append(f"  {method.name}: {space} -> {drawn}")
    return lines
