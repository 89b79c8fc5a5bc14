"""``recpost configs``: the configs shipped with the package, listed or copied out for editing (as torchtune's
``tune ls`` and ``tune cp``).

Any ``--config`` takes a shipped config's name (``experiments/paper_ml1m.yaml``, ``experiments/paper_ml1m``
or ``configs/experiments/paper_ml1m.yaml``) where no such file exists; a copy made here is then named by
its own path. Where names are found: :mod:`recpost.core.configs`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from recpost.core.configs import description, shipped, shipped_dir, shipped_names
from recpost.core.errors import RecpostError

WIDTH = 100  # longest description line shown (a config's first sentence, cut on a word)


def configs(args: list[str]) -> None:
    """List the shipped configs, or copy one out to edit (recpost configs cp NAME [DEST])."""
    parser = argparse.ArgumentParser(
        prog="recpost configs", description="The configs shipped with recpost: name one with --config "
        "<folder>/<name>.yaml from any folder, or copy one out to edit it.")
    actions = parser.add_subparsers(dest="action", metavar="{ls,cp}")
    actions.add_parser("ls", help="every shipped config, by folder, with its first comment line (the default)")
    cp = actions.add_parser("cp", help="copy a shipped config to DEST (a file, or a folder to copy into)")
    cp.add_argument("name", help="a shipped config, e.g. experiments/sim.yaml (recpost configs lists them)")
    cp.add_argument("dest", nargs="?", default=".", help="target file or folder (default: the working directory)")
    cp.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    parsed = parser.parse_args(args)
    if parsed.action == "cp":
        print(f"copied {parsed.name} to {copy_config(parsed.name, parsed.dest, parsed.force)}")
    else:
        print(listing())


def listing() -> str:
    """Every shipped config, grouped by folder, each with its description."""
    names = shipped_names()
    width = max(len(Path(n).name) for n in names)
    lines = [f"shipped configs ({shipped_dir()}); use one as --config <folder>/<name>.yaml, from any folder,",
             "or copy it out to edit: recpost configs cp <folder>/<name>.yaml [DEST]"]
    folder = None
    for name in names:
        if Path(name).parent.as_posix() != folder:
            folder = Path(name).parent.as_posix()
            lines += ["", f"{folder}/"]
        lines.append(f"  {Path(name).name:<{width}}  {_cut(description(shipped_dir() / name))}")
    return "\n".join(lines)


def copy_config(name: str, dest: str = ".", force: bool = False) -> Path:
    """Copy the shipped config ``name`` to ``dest`` (into it, when it is a folder); never over a file unless
    ``force``. Returns the path written."""
    source = shipped(name)
    if source is None:
        raise RecpostError(f"no shipped config {name}; `recpost configs` lists them (e.g. experiments/sim.yaml)")
    target = Path(dest)
    if target.is_dir() or dest.endswith(("/", "\\")):
        target = target / source.name
    if target.exists() and not force:
        raise RecpostError(f"{target} exists; pass --force to overwrite it, or give another DEST")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def _cut(text: str) -> str:
    return text if len(text) <= WIDTH else text[:WIDTH].rsplit(" ", 1)[0] + " ..."
