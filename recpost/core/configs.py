"""The configs shipped inside the package (``recpost/configs/``) and how a config name is found.

The configs are package data, found through :mod:`importlib.resources`, so that an installed wheel runs
its recipes from any folder, as torchtune's ``tune run ... --config llama3/8B_lora`` does. In a checkout
the top-level ``configs/`` is a symlink to this folder, so ``configs/...`` paths work there as before.

A config is named by a path or by its shipped name: a path that exists wins; otherwise
``experiments/paper_ml1m.yaml``, ``experiments/paper_ml1m`` and ``configs/experiments/paper_ml1m.yaml``
all name the shipped ``recpost/configs/experiments/paper_ml1m.yaml``. A reference inside a config
(``pretrain_config: ../pretrain/sim.yaml``) is read relative to that config first, then as a shipped name
(leading ``../`` dropped), so a config copied out with ``recpost configs cp`` still finds the shipped
configs it names.
"""

from __future__ import annotations

import difflib
import os
import re
from importlib.resources import files
from pathlib import Path

from recpost.core.errors import RecpostError

SUFFIXES = (".yaml", ".yml")
LIST_HINT = "`recpost configs` lists the shipped configs"


def shipped_dir() -> Path:
    """The folder of the shipped configs (``recpost/configs`` of the installed package).

    In a checkout, the same folder through the top-level ``configs`` symlink: the paths are then the ones
    they were before the configs moved into the package, and ``recpost experiment``'s stage keys, which hash
    the config paths of each command, still match the stages a study finished before the move."""
    folder = files("recpost").joinpath("configs")
    if not isinstance(folder, Path):  # a zip import: jsonargparse and the stage subprocesses need real files
        raise RecpostError("recpost is imported from a zip archive, so its configs are no files; install the "
                           "wheel with pip (unpacked)")
    checkout = folder.parent.parent / "configs"
    if checkout.is_symlink() and checkout.resolve() == folder.resolve():
        return checkout
    return folder


def shipped_names() -> list[str]:
    """Every shipped config as ``<folder>/<name>.yaml``, sorted."""
    root = shipped_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file())


def shipped_in(folder: str) -> list[str]:
    """The names (stems) of the shipped configs in ``folder`` (``method``, ``data``, ...)."""
    return sorted(Path(n).stem for n in shipped_names() if Path(n).parent.as_posix() == folder)


def shipped(name: str | Path) -> Path | None:
    """The shipped config that ``name`` names, or None: ``experiments/sim``, ``experiments/sim.yaml``,
    ``configs/experiments/sim.yaml`` (and, for references inside configs, ``../pretrain/sim.yaml``)."""
    parts = [p for p in Path(name).parts if p not in (".", "..")]
    if parts[:1] == ["configs"]:
        parts = parts[1:]
    if not parts or Path(name).is_absolute():
        return None
    path = Path(os.path.abspath(shipped_dir().joinpath(*parts)))
    for candidate in (path, *(path.with_name(path.name + s) for s in SUFFIXES if path.suffix not in SUFFIXES)):
        if candidate.is_file():
            return candidate
    return None


def find_config(name: str | Path, *bases: Path) -> Path:
    """The config file ``name`` names: a path relative to each of ``bases`` (the folder of the config that
    refers to it, then the working directory), else a shipped config. Absolute, with symlinks kept: stage
    keys of ``recpost experiment`` hash these paths, and a checkout reaches its configs through the
    ``configs`` symlink, as before the configs moved into the package."""
    for base in bases or (Path.cwd(),):
        candidate = base / name
        if candidate.is_file():
            return Path(os.path.abspath(candidate))
    found = shipped(name)
    if found is not None:
        return found
    looked = ", ".join(str(b) for b in bases or (Path.cwd(),))
    raise RecpostError(f"config file not found: {name} (looked in {looked} and the shipped configs){_close(name)} "
                       f"({LIST_HINT})")


def config_args(args: list[str]) -> list[str]:
    """Command-line ``args`` with each ``--config NAME`` / ``-c NAME`` / ``--config=NAME`` that is no file
    replaced by the shipped config's path (LightningCLI's parser reads only paths)."""
    out = list(args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if eq and flag == "--config":
            out[i] = f"--config={_config_path(value)}"
        elif arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = _config_path(out[i + 1])
    return out


def _config_path(value: str) -> str:
    """``value`` unchanged when it is a file or no config at all (an inline YAML string, which LightningCLI
    also takes after --config), else the path of the shipped config it names (or one error line)."""
    if Path(value).is_file() or "\n" in value or ":" in value or value.startswith(("{", "[")):
        return value
    return str(find_config(value))


def description(path: Path) -> str:
    """The first sentence of a config's opening comment: what ``recpost configs`` shows beside its name."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.lstrip("# ").startswith(("recpost ", "RECPOST_")):
            break  # the comment ended, or an example command starts
        words.append(line.lstrip("#").strip())
    return re.split(r"(?<! al)\. ", " ".join(words))[0].rstrip(".,:; ")  # a sentence ends at ". ", not "et al. "


def _close(name: str | Path) -> str:
    stem = Path(name).stem
    names = shipped_names()
    close = [n for n in names if Path(n).stem == stem] or difflib.get_close_matches(str(name), names, n=2)
    if not close:
        return ""
    return f"; did you mean {close[0]}?" if len(close) == 1 else f"; did you mean {', '.join(close[:-1])} or {close[-1]}?"
