"""A stage's model settings, read and checked through its method class, before anything runs.

The experiment config names method configs; their ``model.class_path`` says which recpost method a stage
trains, and the class says which settings it takes (``setting_defaults``) and which values it accepts
(``check_settings``). :mod:`.study` checks every stage of a study with these helpers.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from recpost.core.errors import RecpostError
from recpost.methods import RecModule


def read_method_class(label: str, config: Path, where: Path) -> tuple[type[RecModule], dict[str, Any]]:
    """The recpost method class the config's ``model.class_path`` names, and its ``model.init_args``
    (``label``: the study key that names the config, for the error message)."""
    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    model = model if isinstance(model, dict) else {}
    class_path = model.get("class_path")
    if not class_path:
        raise RecpostError(f"{where}: {label}: {config} sets no model.class_path")
    module, _, cls = class_path.rpartition(".")
    try:
        method = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError):
        method = None
    if not (isinstance(method, type) and issubclass(method, RecModule)):
        raise RecpostError(f"{where}: {label}: {class_path} (in {config}) is not a recpost method; "
                           "use one of recpost.methods.SFT, ExpSFT, PPO, DPO, RewardModel")
    init_args = model.get("init_args") or {}
    return method, dict(init_args) if isinstance(init_args, dict) else {}


def check_settings(cls: type[RecModule], settings: dict[str, Any], where: str) -> None:
    try:
        cls.check_settings(**settings)
    except RecpostError as exc:
        raise RecpostError(f"{where}: {exc}") from None


def accepted(cls: type[RecModule], settings: Mapping[str, Any]) -> dict[str, Any]:
    known = cls.setting_defaults()
    return {k: v for k, v in settings.items() if k in known}


def keys_of(cls: type[RecModule], settings: Mapping[str, Any], where: str) -> None:
    """Refuse a key the method does not take, naming the closest one it does."""
    known = list(cls.setting_defaults())
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            raise RecpostError(f"{where}.{key}: {cls.__name__} has no setting {key!r}"
                               + (f"; did you mean {close[0]}?" if close else f"; it takes {', '.join(sorted(known))}"))


def override_settings(flags: list[str]) -> dict[str, Any]:
    """The model settings among ``--model.init_args.<key>=<value>`` flags (YAML values, as the CLI reads them)."""
    settings: dict[str, Any] = {}
    for i, flag in enumerate(flags):
        name, eq, value = str(flag).partition("=")
        if not name.startswith("--model.") or name in ("--model.class_path", "--model.init_args"):
            continue
        if not eq:
            value = flags[i + 1] if i + 1 < len(flags) else ""
        key = name[len("--model."):]
        key = key[len("init_args."):] if key.startswith("init_args.") else key
        top = key.split(".")[0]  # a nested key (backbone.d_model) names its top setting
        settings[top] = yaml.safe_load(value) if top == key else settings.get(top)
    return settings
