"""Checks of method settings, in one style: each raises one ``RecpostError`` line,
``model.<name> must be <rule> (got <value>); <hint>``, at the top of the method's ``__init__``
(before anything is built or loaded). LightningCLI already refuses values outside a ``Literal``;
these also cover programmatic construction and numeric constraints.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from recpost.core.errors import RecpostError


def _fail(name: str, rule: str, value: Any, hint: str) -> None:
    raise RecpostError(f"model.{name} must be {rule} (got {value!r}){'; ' + hint if hint else ''}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def positive(name: str, value: Any, hint: str = "") -> None:
    """``value > 0`` (and not NaN)."""
    if not (_number(value) and value > 0):
        _fail(name, "> 0", value, hint)


def finite(name: str, value: Any, hint: str = "") -> None:
    """A finite number."""
    if not (_number(value) and math.isfinite(value)):
        _fail(name, "a finite number", value, hint)


def finite_positive(name: str, value: Any, hint: str = "") -> None:
    """``0 < value < inf``."""
    if not (_number(value) and 0 < value < math.inf):
        _fail(name, "> 0 and finite", value, hint)


def non_negative(name: str, value: Any, hint: str = "") -> None:
    """``value >= 0`` (and not NaN)."""
    if not (_number(value) and value >= 0):
        _fail(name, ">= 0", value, hint)


def at_least(name: str, value: Any, low: int, hint: str = "") -> None:
    """An integer ``>= low``."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        _fail(name, f"an integer >= {low}", value, hint)


def in_interval(name: str, value: Any, low: float, high: float, hint: str = "") -> None:
    """``low <= value < high``."""
    if not (_number(value) and low <= value < high):
        _fail(name, f"in [{low:g}, {high:g})", value, hint)


def optional(check, name: str, value: Any, *args: Any, hint: str = "null turns it off") -> None:
    """``check(name, value, *args, hint=...)`` unless ``value`` is ``None`` (``null`` in YAML: the feature is off)."""
    if value is not None:
        check(name, value, *args, hint=hint)


def one_of(name: str, value: Any, choices: Collection[str]) -> None:
    """One of ``choices`` (a ``Literal``'s values)."""
    if value not in choices:
        _fail(name, f"one of {', '.join(choices)}", value, "")


def require(ok: bool, message: str) -> None:
    """A rule between settings (e.g. ``k >= 2`` with a group baseline): the whole message is given."""
    if not ok:
        raise RecpostError(message)


def check_judges(s: Mapping[str, Any]) -> None:
    """``judges``: null or a list of distinct RewardModel checkpoints, none of them a reward model the method
    trains against (``reward_model``, ``reward_ensemble``): a judge must be independent of those."""
    judges = s.get("judges")
    require(judges is None or (isinstance(judges, (list, tuple)) and len(judges) >= 1),
            f"model.judges must be a list of RewardModel checkpoints (got {judges!r}); e.g. --model.init_args.judges "
            "'[judge0.ckpt, judge1.ckpt, judge2.ckpt]', or null for none")
    paths = [_same_file(p) for p in judges or []]
    twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    require(twice is None, f"model.judges lists {twice} twice; each judge must be trained independently "
                           "(another seed and bootstrap resample), or their spread means nothing")
    trained = [s.get("reward_model"), *(s.get("reward_ensemble") or [])]
    shared = next((p for p in paths if p in {_same_file(t) for t in trained if t}), None)
    require(shared is None, f"model.judges includes {shared}, a reward model this method trains against; a judge "
                            "must be trained independently of it (the experiment's judges: {count: K} does this)")
    reference = s.get("judge_reference")
    require(not reference or _same_file(reference) not in paths,
            f"model.judge_reference {reference} is also one of model.judges; the reference is the reward model the "
            "judges are compared with (the one the methods train against), not a judge")


def _same_file(path: Any) -> Path:
    return Path(str(path)).expanduser().resolve()
