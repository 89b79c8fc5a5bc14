"""Checks of method settings, in one style: each raises one ``RecpostError`` line,
``model.<name> must be <rule> (got <value>); <hint>``, at the top of the method's ``__init__``
(before anything is built or loaded). LightningCLI already refuses values outside a ``Literal``;
these also cover programmatic construction and numeric constraints.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from recpost.errors import RecpostError


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
