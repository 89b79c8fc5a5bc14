"""The experiment config, read and checked once: every mistake is one line before anything runs.

An experiment YAML names the pretrain config, the methods with their grids, the reward model and the
budgets; :func:`load_study` turns it into a :class:`Study`. Whether a method takes or needs a reward
model is asked of the method class its config names (``takes_reward_model``,
``needs_reward_model``), not guessed from the keys of its YAML.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from recpost.errors import RecpostError
from recpost.methods import RecModule

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "configs/experiments/sim.yaml"
STUDY_KEYS = {"name", "pretrain_config", "data", "pretrained", "methods", "seeds", "posttrain_epochs",
              "pretrain_overrides", "posttrain_overrides", "monitor", "monitor_mode", "reward_model", "wandb"}
METHOD_KEYS = {"config", "grid", "epochs", "overrides"}
RM_KEYS = {"config", "epochs", "overrides", "evaluator"}


@dataclass
class MethodSpec:
    """One post-training method of the study: its config file and class, the grid of its settings, its budget."""

    name: str
    config: Path
    method_class: type[RecModule]
    init_args: dict[str, Any] = field(default_factory=dict)  # the config's model.init_args
    grid: dict[str, list] = field(default_factory=dict)
    epochs: int | None = None
    overrides: list[str] = field(default_factory=list)

    def settings(self) -> list[dict]:
        """Every point of the grid (one empty setting without a grid), in the grid's key order."""
        if not self.grid:
            return [{}]
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in product(*(self.grid[k] for k in keys))]

    @property
    def takes_reward_model(self) -> bool:
        """The method has a ``reward_model`` argument: it gets the study's RM checkpoint when there is one."""
        return self.method_class.takes_reward_model

    def needs_reward_model(self, setting: Mapping[str, Any]) -> bool:
        """The method cannot train at this grid point without a reward model (e.g. PPO; DPO unless
        ``pair_source: logged``)."""
        return self.method_class.needs_reward_model({**self.init_args, **setting})


@dataclass
class RewardModelSpec:
    """The reward model trained per seed from the base checkpoint (and, with ``evaluator``, a second,
    independently trained one that only scores the methods at test time)."""

    config: Path
    epochs: int | None = None
    overrides: list[str] = field(default_factory=list)
    evaluator: bool = False


@dataclass
class Study:
    """A checked experiment config: paths resolved, methods' classes known."""

    name: str
    pretrain_config: Path
    methods: list[MethodSpec]
    path: Path | None = None  # the experiment YAML itself
    data_config: Path | None = None
    pretrained: list[Path] = field(default_factory=list)
    seeds: int = 1
    posttrain_epochs: int = 10
    pretrain_overrides: list[str] = field(default_factory=list)
    posttrain_overrides: list[str] = field(default_factory=list)
    monitor: str = "val/ndcg@10"
    monitor_mode: str = "max"
    reward_model: RewardModelSpec | None = None
    wandb: dict | None = field(default_factory=dict)

    @property
    def base_configs(self) -> list[Path]:
        """The config files every stage starts from, in the order they compose (pretrain, then data)."""
        return [self.pretrain_config, *([self.data_config] if self.data_config else [])]


def load_study(path: str) -> Study:
    """Read and check an experiment YAML; raises :class:`RecpostError` with one line on the first mistake."""
    cfg_path = _resolve(path, Path.cwd())
    raw = yaml.safe_load(cfg_path.read_text()) or {}
    base = cfg_path.parent
    _keys(raw, STUDY_KEYS, str(cfg_path))
    if "pretrain_config" not in raw or not raw.get("methods"):
        raise RecpostError(f"{cfg_path}: needs pretrain_config and at least one entry under methods")
    methods = [_method(name, spec or {}, cfg_path) for name, spec in raw["methods"].items()]
    rm = None
    if raw.get("reward_model"):
        spec = raw["reward_model"]
        _keys(spec, RM_KEYS, f"{cfg_path}: reward_model")
        rm = RewardModelSpec(_resolve(spec.get("config", "configs/method/reward_model.yaml"), base),
                             spec.get("epochs"), list(spec.get("overrides", [])), bool(spec.get("evaluator", False)))
    needing = [m.name for m in methods if any(m.needs_reward_model(s) for s in m.settings())]
    if needing and rm is None:
        raise RecpostError(f"{cfg_path}: methods {needing} train against a reward model; add a reward_model: "
                           "section (e.g. reward_model: {config: ../method/reward_model.yaml})")
    data_config = _data_config(raw.get("data"), cfg_path)
    pretrained = raw.get("pretrained") or []
    pretrained = [_resolve(p, base) for p in ([pretrained] if isinstance(pretrained, str) else pretrained)]
    wandb = raw.get("wandb", {})
    if wandb not in (False, None) and not isinstance(wandb, dict):
        raise RecpostError(f"{cfg_path}: wandb must be false or a mapping (project, entity, group)")
    return Study(
        name=raw.get("name", cfg_path.stem), pretrain_config=_resolve(raw["pretrain_config"], base), methods=methods,
        path=cfg_path, data_config=data_config, pretrained=pretrained,
        seeds=int(raw.get("seeds", 1)), posttrain_epochs=int(raw.get("posttrain_epochs", 10)),
        pretrain_overrides=list(raw.get("pretrain_overrides", [])),
        posttrain_overrides=list(raw.get("posttrain_overrides", [])), monitor=raw.get("monitor", "val/ndcg@10"),
        monitor_mode=_mode(raw.get("monitor_mode", "max"), cfg_path), reward_model=rm,
        wandb=None if wandb in (False, None) else dict(wandb),
    )


def _method(name: str, spec: dict, cfg_path: Path) -> MethodSpec:
    _keys(spec, METHOD_KEYS, f"{cfg_path}: methods.{name}")
    if "config" in spec:
        config = _resolve(spec["config"], cfg_path.parent)
    elif (REPO_ROOT / "configs" / "method" / f"{name}.yaml").is_file():
        config = REPO_ROOT / "configs" / "method" / f"{name}.yaml"
    else:
        raise RecpostError(f"{cfg_path}: unknown method {name!r}; give methods.{name}.config or use one of "
                           f"{_known('method')}")
    grid = spec.get("grid") or {}
    if "grid" in spec and not grid:
        raise RecpostError(f"{cfg_path}: methods.{name}.grid is empty; remove it or give each key a non-empty list")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise RecpostError(f"{cfg_path}: methods.{name}.grid.{key} must be a non-empty list")
    method_class, init_args = _method_class(name, config, cfg_path)
    return MethodSpec(name, config, method_class, init_args, grid, spec.get("epochs"), list(spec.get("overrides", [])))


def _method_class(name: str, config: Path, where: Path) -> tuple[type[RecModule], dict[str, Any]]:
    """The recpost method class the config's ``model.class_path`` names, and its ``model.init_args``."""
    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    model = model if isinstance(model, dict) else {}
    class_path = model.get("class_path")
    if not class_path:
        raise RecpostError(f"{where}: methods.{name}: {config} sets no model.class_path")
    module, _, cls = class_path.rpartition(".")
    try:
        method = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError):
        method = None
    if not (isinstance(method, type) and issubclass(method, RecModule)):
        raise RecpostError(f"{where}: methods.{name}: {class_path} (in {config}) is not a recpost method; "
                           "use one of recpost.methods.SFT, ExpSFT, PPO, DPO, RewardModel")
    init_args = model.get("init_args") or {}
    return method, dict(init_args) if isinstance(init_args, dict) else {}


def _data_config(data: Any, cfg_path: Path) -> Path | None:
    """``data:`` names a shipped data config (``ml100k``, ``sim``, ...) or a path to one."""
    if not data:
        return None
    data = str(data)
    if data in _known("data"):
        return REPO_ROOT / "configs" / "data" / f"{data}.yaml"
    if data.endswith((".yaml", ".yml")):
        return _resolve(data, cfg_path.parent)
    raise RecpostError(f"{cfg_path}: unknown dataset {data!r}; use one of {_known('data')} or a data config path")


def _resolve(path: str, base: Path) -> Path:
    """A config path as given, else relative to the experiment file, else to the repository."""
    for candidate in (Path(path), base / path, REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise RecpostError(f"config file not found: {path} (looked in ., {base} and {REPO_ROOT})")


def _known(folder: str) -> list[str]:
    return sorted(p.stem for p in (REPO_ROOT / "configs" / folder).glob("*.yaml"))


def _keys(raw: dict, allowed: set[str], where: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise RecpostError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _mode(mode: str, where: Path) -> str:
    if mode not in ("max", "min"):
        raise RecpostError(f"{where}: monitor_mode must be max or min (got {mode!r})")
    return mode
