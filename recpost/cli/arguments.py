"""What a ``recpost fit | validate | test | predict`` command line says, for the CLI's two checks that
Lightning does not make.

- **Parse errors in one line.** jsonargparse explains a bad key or value as a tree of every type it
  tried (and, by default, under the whole usage text). :func:`explain_parse_error` keeps the cause:
  ``model.init_args.lrr: no such option; did you mean lr?``.
- **Settings given with ``--ckpt_path``.** Lightning rebuilds the model from the checkpoint's
  hyperparameters, over the command line. Evaluation-time settings (:data:`EVAL_TIME_SETTINGS`) given on
  the command line or in a ``--config`` file are put back on top; a training-only setting given as a
  flag that differs from the checkpoint is refused (it could only be ignored: the weights were trained
  with the checkpoint's value).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from recpost.core.errors import RecpostError

# Model settings that change only how a trained model is evaluated: at validate / test / predict time
# the command line wins over the checkpoint's hyperparameters.
EVAL_TIME_SETTINGS = ("mask_history", "eval_reward_model", "judges", "judge_reference", "score_chunk_size")
# Lines of jsonargparse's explanation that describe the search, not the problem.
_NOISE = ("Does not validate against any of", "Subtypes:", "Errors:", "Given value type:",
          "Expected a <class 'NoneType'>", "tip:")


# ----------------------------------------------------------------------------------- parse errors
def explain_parse_error(message: str, known_keys: Iterable[str] = ()) -> str:
    """jsonargparse's error ``message`` as one line: the key, what is wrong with it and, for a misspelt
    key, the closest accepted one (``known_keys``: every dotted key of the subcommand's parser)."""
    if match := re.search(r"unrecognized arguments: (\S+)", message):
        key = match.group(1).lstrip("-").split("=")[0]
        close = difflib.get_close_matches(key, list(known_keys), n=1, cutoff=0.6)
        return f"{key}: no such option" + (f"; did you mean {close[0]}?" if close else "; see --help")
    if match := re.search(r"File does not exist: '([^']+)'", message):
        return f"--config: file not found: {match.group(1)}"
    chain = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    key = _user_key(chain, classes)
    if match := re.search(r"Option '([^']+)' is not accepted", message):
        option = match.group(1)
        close = difflib.get_close_matches(option, _accepted(classes[-1]) if classes else [], n=1, cutoff=0.6)
        return f"{key}.{option}: no such option" + (f"; did you mean {close[0]}?" if close else "")
    if match := re.search(r"module '([^']+)' has no attribute '([^']+)'", message):
        module, name = match.groups()
        names = [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        return f"{key}: no class {module}.{name}" + (f"; did you mean {module}.{close[0]}?" if close else "")
    problem = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message)
    if problem and not problem.group(2).startswith(("Parser key", "Option", "Does not validate", "- ")):
        return f"{key}: cannot use {problem.group(1)} ({problem.group(2).strip().rstrip('.')})"
    if match := re.search(r"Expected a (.+?)\. Got value: (.*)", message):
        return f"{key}: {_expected(match.group(1), match.group(2).strip())}"
    expected = [t for t in re.findall(r"Expected a (<class '[^']+'>|typing\.\S+)", message) if "NoneType" not in t]
    given = re.findall(r"Given value: (.*)", message)
    if expected and given:
        return f"{key}: {_expected(' or '.join(expected), given[-1].strip())}"
    lines = [line.strip(" -") for line in message.splitlines() if line.strip() and not line.strip(" -").startswith(_NOISE)]
    return (f"{key}: " if chain else "") + (lines[-1] if lines else message.strip())


def _user_key(chain: list[str], classes: list[str]) -> str:
    """The dotted key as a user writes it: ``init_args`` after a class-typed key (``model``, ``data.source``),
    none inside a dataclass (``backbone.d_model``)."""
    parts: list[str] = []
    for i, key in enumerate(chain):
        parts.append(key)
        cls = _import(classes[i]) if i < len(classes) else None
        if cls is not None and not dataclasses.is_dataclass(cls):
            parts.append("init_args")
    return ".".join(parts) if parts else "config"


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _accepted(class_path: str) -> list[str]:
    """The keys a class accepts: a recpost method's settings, a dataclass's fields, or its __init__'s parameters."""
    cls = _import(class_path)
    if cls is None:
        return []
    if hasattr(cls, "setting_defaults"):
        return list(cls.setting_defaults())
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def _expected(types: str, value: str) -> str:
    literal = re.search(r"Literal\[(.*)\]", types)
    if literal:
        choices = [c.strip().strip("'\"") for c in literal.group(1).split(",")]
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
        return f"must be one of {', '.join(choices)} (got {value!r})" + (f"; did you mean {close[0]}?" if close else "")
    names = re.findall(r"<class '([^']+)'>", types) or [types]
    if "float" in names and value.lower().lstrip("+-.") in ("inf", "infinity", "nan"):
        return f"must be a finite number (got {value!r})"
    return f"must be {' or '.join('an ' + n if n[0] in 'aeiou' else 'a ' + n for n in names)} (got {value!r})"


# ----------------------------------------------------------------------------------- settings with --ckpt_path
def given_model_settings(argv: list[str]) -> tuple[set[str], set[str]]:
    """(model settings given as flags, model settings given in ``--config`` files) of a command line, as
    dotted paths below ``init_args`` (``lr``, ``backbone.d_model``)."""
    flags, files = set(), set()
    for i, arg in enumerate(argv):
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if name.startswith("model."):
            path = name[len("model."):]
            path = path[len("init_args."):] if path.startswith("init_args.") else path
            if path not in ("class_path", "init_args", "dict_kwargs"):
                flags.add(path)
        elif name == "config" or arg == "-c":
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            files |= _config_model_keys(Path(value))
    return flags, files


def _config_model_keys(path: Path) -> set[str]:
    try:
        model = (yaml.safe_load(path.read_text()) or {}).get("model")
    except (OSError, yaml.YAMLError, AttributeError):
        return set()
    if not isinstance(model, Mapping):
        return set()
    init_args = model.get("init_args") if isinstance(model.get("init_args"), Mapping) else {}
    direct = {k for k in model if k not in ("class_path", "init_args", "dict_kwargs")}
    return set(init_args) | direct


def lookup(settings: Any, path: str) -> Any:
    """The value at a dotted ``path`` of nested mappings / namespaces / dataclasses (``None`` if absent)."""
    value = settings
    for part in path.split("."):
        if value is None:
            return None
        if isinstance(value, Mapping) or hasattr(value, "get"):
            value = value.get(part)
        else:
            value = getattr(value, part, None)
    return value


def same_setting(given: Any, stored: Any) -> bool:
    """Whether a setting from the command line equals the checkpoint's (numbers by value, paths as strings)."""
    if isinstance(given, (int, float)) and isinstance(stored, (int, float)) and not isinstance(given, bool):
        return math.isclose(float(given), float(stored), rel_tol=1e-9, abs_tol=0.0) or given == stored
    if dataclasses.is_dataclass(given):
        given = dataclasses.asdict(given)
    if hasattr(given, "as_dict"):
        given = given.as_dict()
    return given == stored or str(given) == str(stored)


def refuse_training_flags(flags: set[str], config_values: Any, hparams: Mapping[str, Any], ckpt_path: str) -> None:
    """One line for the first training-only setting given as a flag with ``--ckpt_path`` that differs from
    the checkpoint's value."""
    for path in sorted(flags):
        if path.split(".")[0] in EVAL_TIME_SETTINGS:
            continue
        given, stored = lookup(config_values, path), lookup(hparams, path)
        if not same_setting(given, stored):
            raise RecpostError(
                f"model.init_args.{path}: {given!r} differs from the checkpoint's {stored!r} (--ckpt_path {ckpt_path}); "
                f"it only changes training, so it cannot apply to a trained model: drop the flag (or fit a new "
                f"model with it); settings that apply at evaluation: {', '.join(EVAL_TIME_SETTINGS)}")
