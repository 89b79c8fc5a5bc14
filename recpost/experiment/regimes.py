"""A regime map: one study run in every simulated world of a grid, to see where each method helps or hacks.

A regime map is an experiment config (the base study: pretraining, reward model, methods and their
grids, budgets, ``quick:``) with one more section, ``worlds:``, the simulator settings that vary (fields
of :class:`~recpost.data.simulator.WorldConfig`)::

    worlds:
      grid: {noise_std: [0.25, 1.0], exposure_concentration: [0.0, 1.5]}   # every combination is a world
      extra: {placebo: {shuffle_ratings: true}}                             # named worlds off the grid
      heatmap: [noise_std, exposure_concentration]                          # the figures' two axes

Each world is the base study with one config more, composed last: ``<out>/<world>/world.yaml``, its
``data.source.init_args.world`` settings. So every stage (pretraining, reward models, methods), the data
prepared before them and the report's figures read the same world, and ``<out>/<world>/`` is an ordinary
experiment folder: the runner and its stage cache work there as for any study. A ``quick:`` section may
hold ``worlds:`` too: for ``--quick`` it replaces the map's ``grid``, ``extra`` and ``heatmap``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from recpost.data.simulator import Simulator, WorldConfig
from recpost.core.errors import RecpostError
from recpost.core.files import write_text
from recpost.experiment.plan import Plan, build_plan
from recpost.experiment.study import Study, parse_study, read_config, resolve_path

WORLDS_KEYS = {"grid", "extra", "heatmap"}
WORLD_SETTINGS = tuple(f.name for f in dataclasses.fields(WorldConfig))
WORLD_CONFIG = "world.yaml"  # the world's data settings, in its folder
SIMULATOR = "recpost.data.Simulator"
REFERENCE = "sft"  # the method every other is compared with, in the same world and seed
# Names inside the map's output folder that a world's folder may not take.
RESERVED_NAMES = {"figures"}


@dataclass(frozen=True)
class World:
    """One cell of the map: its folder name and the simulator settings it changes."""

    name: str
    settings: dict[str, Any]
    on_grid: bool = True  # extra worlds (the placebo) are table rows, not heatmap cells

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())


@dataclass(frozen=True)
class RegimeMap:
    """A checked regime map: the base study, its grid axes and every world."""

    name: str
    path: Path
    study: Study  # the base study; each world's is this one with its world config
    axes: dict[str, list]
    worlds: tuple[World, ...]
    heatmap: tuple[str, str] | None  # the two grid axes of the figures; None: fewer than two axes vary

    def world_study(self, world: World, out: Path) -> Study:
        """The base study in ``world``: its own name (so its folder is its own) and world config."""
        return dataclasses.replace(self.study, name=f"{self.name}-{world.name}",
                                   world_config=(out / world.name / WORLD_CONFIG).resolve())

    def plans(self, out: Path, seeds: int | None = None) -> list[Plan]:
        """One plan per world, in ``<out>/<world>/``, in the order of :attr:`worlds`."""
        return [build_plan(self.world_study(w, out), out / w.name, seeds) for w in self.worlds]

    def describe(self, plans: list[Plan]) -> str:
        """Every world and its stages with their commands (``--dry-run``)."""
        stages = sum(len(p.stages) for p in plans)
        axes = [f"{k}: {', '.join(map(str, v))}" for k, v in self.axes.items()]
        extra = [w.name for w in self.worlds if not w.on_grid]
        shown = "; ".join([*axes, *([f"plus {', '.join(extra)}"] if extra else [])])
        lines = [f"regime map {self.name}: {len(self.worlds)} worlds ({shown}), {stages} stages in all"]
        for i, (world, plan) in enumerate(zip(self.worlds, plans), 1):
            lines += ["", f"=== world {i}/{len(self.worlds)}: {world.name} ({world.label}); its settings are "
                          f"{plan.study.world_config}, written when it runs", plan.describe()]
        return "\n".join(lines)


def is_regime_map(path: str) -> bool:
    """Whether the experiment YAML at ``path`` has a ``worlds:`` section (then it runs once per world)."""
    raw = read_config(resolve_path(path, Path.cwd()))
    return "worlds" in raw


def load_regime_map(path: str, quick: bool = False) -> RegimeMap:
    """Read and check a regime map; one :class:`RecpostError` line on the first mistake (a world key the
    simulator does not have, a bad value, a study whose data is not the simulator's, ...)."""
    cfg_path = resolve_path(path, Path.cwd())
    raw = read_config(cfg_path)
    spec, where = raw.pop("worlds"), f"{cfg_path}: worlds"
    quick_section = raw.get("quick")
    if isinstance(quick_section, dict) and "worlds" in quick_section:
        raw["quick"] = {k: v for k, v in quick_section.items() if k != "worlds"}
        if quick:
            spec, where = quick_section["worlds"], f"{cfg_path}: quick.worlds"
    study = parse_study(raw, cfg_path, quick)
    if REFERENCE not in [m.name for m in study.methods]:
        raise RecpostError(f"{cfg_path}: a regime map gives each method's gain over {REFERENCE} in every world; add "
                           f"{REFERENCE} to its methods ({REFERENCE}: {{}})")
    axes, extra, heatmap = _worlds_section(spec, where)
    worlds = [World("-".join(f"{k}{v}" for k, v in s.items()), s) for s in _combinations(axes)]
    worlds += [World(name, settings, on_grid=False) for name, settings in extra.items()]
    _check_names(worlds, where)
    source = _study_source(study, cfg_path)
    for world in worlds:
        _check_world(source, world, where)
    return RegimeMap(study.name, cfg_path, study, axes, tuple(worlds), heatmap)


def write_world_config(study: Study, world: World) -> Path:
    """``world.yaml`` in the world's folder: its settings as a ``data:`` section composed after the study's."""
    path = study.world_config
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# World {world.name} of a regime map, written by recpost experiment: composed after the study's "
              "configs in every stage.\n")
    body = {"data": {"source": {"init_args": {"world": dict(world.settings)}}}}
    write_text(path, header + yaml.safe_dump(body, sort_keys=False))
    return path


def _worlds_section(spec: Any, where: str) -> tuple[dict[str, list], dict[str, dict], tuple[str, str] | None]:
    """The grid axes, the extra worlds and the heatmap axes of a ``worlds:`` section."""
    unknown = set(spec) - WORLDS_KEYS if isinstance(spec, dict) else set()
    if unknown:
        raise RecpostError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(WORLDS_KEYS)}")
    if not isinstance(spec, dict) or not (spec.get("grid") or spec.get("extra")):
        raise RecpostError(f"{where} must be a mapping with a grid (e.g. grid: {{noise_std: [0.25, 1.0]}}) and/or "
                           "extra worlds (e.g. extra: {placebo: {shuffle_ratings: true}})")
    axes = spec.get("grid") or {}
    extra = spec.get("extra") or {}
    if not isinstance(axes, dict) or not isinstance(extra, dict):
        raise RecpostError(f"{where}: grid maps settings to lists of values, extra maps world names to settings")
    for key, values in axes.items():
        _setting_name(key, f"{where}.grid")
        if not isinstance(values, list) or not values:
            raise RecpostError(f"{where}.grid.{key} must be a non-empty list of values")
    for name, settings in extra.items():
        if not isinstance(settings, dict) or not settings:
            raise RecpostError(f"{where}.extra.{name} must map simulator settings to values (e.g. shuffle_ratings: true)")
        for key in settings:
            _setting_name(key, f"{where}.extra.{name}")
    return axes, extra, _heatmap_axes(spec.get("heatmap"), axes, where)


def _setting_name(key: Any, where: str) -> None:
    """Refuse a key that is not a simulator world setting, naming the closest one and all there are."""
    if key not in WORLD_SETTINGS:
        close = difflib.get_close_matches(str(key), WORLD_SETTINGS, n=1)
        raise RecpostError(f"{where}.{key}: the simulator has no world setting {key!r}"
                           + (f" (did you mean {close[0]}?)" if close else "") + f"; allowed: {', '.join(WORLD_SETTINGS)}")


def _heatmap_axes(given: Any, axes: dict[str, list], where: str) -> tuple[str, str] | None:
    """The heatmaps' (x, y) axes: as given, else the first two grid axes with several values (None if fewer)."""
    varying = [k for k, v in axes.items() if len(v) > 1]
    if given is None:
        return tuple(varying[:2]) if len(varying) >= 2 else None
    if not (isinstance(given, list) and len(given) == 2 and given[0] != given[1] and all(g in varying for g in given)):
        raise RecpostError(f"{where}.heatmap must name two different grid axes with several values each "
                           f"(of: {', '.join(varying) or 'none'}), e.g. heatmap: [noise_std, exposure_concentration]")
    return given[0], given[1]


def _combinations(axes: dict[str, list]) -> list[dict[str, Any]]:
    """Every point of the grid, in the grid's key order (the last axis varies fastest)."""
    if not axes:
        return []
    keys = list(axes)
    return [dict(zip(keys, values)) for values in product(*(axes[k] for k in keys))]


def _check_names(worlds: list[World], where: str) -> None:
    """World names are folder names: unique, one path component, not a name the map's folder uses."""
    seen: set[str] = set()
    for world in worlds:
        bad = not world.name or "/" in world.name or world.name.startswith(".") or world.name in RESERVED_NAMES
        if bad or world.name in seen:
            raise RecpostError(f"{where}: world name {world.name!r} " + ("appears twice" if not bad else
                               "cannot be a folder name here") + "; rename the extra world")
        seen.add(world.name)


def _study_source(study: Study, cfg_path: Path) -> dict[str, Any]:
    """The simulator's ``init_args`` the study's configs set (composed in order, ``world`` key by key);
    refuses a study whose data is not the simulator's."""
    class_path, init_args, world = None, {}, {}
    for config in study.base_configs:
        source = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("source") or {}
        class_path = source.get("class_path", class_path)
        init_args.update(source.get("init_args") or {})
        world.update((source.get("init_args") or {}).get("world") or {})
    if class_path != SIMULATOR:
        raise RecpostError(f"{cfg_path}: worlds: vary the simulator's settings, but the study's data source is "
                           f"{class_path or 'not set'}; use the simulator's data (data: sim) or drop worlds:")
    return {**init_args, "world": world}


def _check_world(source: dict[str, Any], world: World, where: str) -> None:
    """The world's settings over the study's, through the simulator's own checks (as its data will be built)."""
    try:
        Simulator(**{**source, "world": WorldConfig(**{**source["world"], **world.settings})})
    except (RecpostError, TypeError, ValueError) as exc:
        raise RecpostError(f"{where}: world {world.name}: {exc}") from None
