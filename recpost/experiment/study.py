"""The experiment config, read and checked once: every mistake is one line before anything runs.

An experiment YAML names the pretrain config, the methods with their grids, the reward model and the
budgets; :func:`load_study` turns it into a :class:`Study`. Whether a method takes or needs a reward
model is asked of the method class its config names (``takes_reward_model``,
``needs_reward_model``), not guessed from the keys of its YAML. Every stage's model settings (its
config's ``model.init_args``, the ``--model.init_args.*`` overrides, the grid point) are checked the same
way: each key against the settings the class takes (``setting_defaults``, with the closest one
suggested), each value against the class's rules (``check_settings``), so that ``grid: {lam: [0]}`` or a
misspelt grid key stops before pretraining, not after.
"""

from __future__ import annotations

import difflib
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
    for key in ("seeds", "posttrain_epochs"):
        _positive_int(raw.get(key, 1), f"{cfg_path}: {key}")
    for spec in [*methods, *([rm] if rm else [])]:
        if spec.epochs is not None:
            _positive_int(spec.epochs, f"{cfg_path}: {getattr(spec, 'name', 'reward_model')}.epochs")
    _check_stage_settings(cfg_path, _resolve(raw["pretrain_config"], base), list(raw.get("pretrain_overrides", [])),
                          list(raw.get("posttrain_overrides", [])), methods, rm)
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
    method_class, init_args = _method_class(f"methods.{name}", config, cfg_path)
    return MethodSpec(name, config, method_class, init_args, grid, spec.get("epochs"), list(spec.get("overrides", [])))


def _method_class(label: str, config: Path, where: Path) -> tuple[type[RecModule], dict[str, Any]]:
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


def _check_stage_settings(cfg_path: Path, pretrain: Path, pretrain_overrides: list[str], posttrain_overrides: list[str],
                          methods: list[MethodSpec], rm: RewardModelSpec | None) -> None:
    """Every stage's model settings, as its ``recpost fit`` will compose them, through the method class's
    checks: the base model, the reward model, each method at each grid point."""
    base_class, inherited = _method_class("pretrain_config", pretrain, cfg_path)  # later configs keep its settings
    _check_settings(base_class, {**inherited, **_overrides(pretrain_overrides)}, f"{cfg_path}: pretrain_config {pretrain}")
    if rm is not None:
        rm_class, rm_args = _method_class("reward_model", rm.config, cfg_path)
        _keys_of(rm_class, rm_args, f"{rm.config}: model.init_args")
        _keys_of(rm_class, _overrides(rm.overrides), f"{cfg_path}: reward_model.overrides")
        _check_settings(rm_class, {**_accepted(rm_class, inherited), **rm_args, **_overrides(posttrain_overrides),
                                   **_overrides(rm.overrides)}, f"{cfg_path}: reward_model")
    for method in methods:
        cls = method.method_class
        _keys_of(cls, method.init_args, f"{method.config}: model.init_args")
        _keys_of(cls, _overrides(method.overrides), f"{cfg_path}: methods.{method.name}.overrides")
        _keys_of(cls, method.grid, f"{cfg_path}: methods.{method.name}.grid")
        rm_arg = {"reward_model": "<the study's reward model>"} if rm is not None and method.takes_reward_model else {}
        for setting in method.settings():
            shown = f" ({', '.join(f'{k}={v}' for k, v in setting.items())})" if setting else ""
            _check_settings(cls, {**_accepted(cls, inherited), **method.init_args, **_overrides(posttrain_overrides),
                                  **_overrides(method.overrides), **rm_arg, **setting},
                            f"{cfg_path}: methods.{method.name}{shown}")


def _check_settings(cls: type[RecModule], settings: dict[str, Any], where: str) -> None:
    try:
        cls.check_settings(**settings)
    except RecpostError as exc:
        raise RecpostError(f"{where}: {exc}") from None


def _accepted(cls: type[RecModule], settings: Mapping[str, Any]) -> dict[str, Any]:
    known = cls.setting_defaults()
    return {k: v for k, v in settings.items() if k in known}


def _keys_of(cls: type[RecModule], settings: Mapping[str, Any], where: str) -> None:
    """Refuse a key the method does not take, naming the closest one it does."""
    known = list(cls.setting_defaults())
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            raise RecpostError(f"{where}.{key}: {cls.__name__} has no setting {key!r}"
                               + (f"; did you mean {close[0]}?" if close else f"; it takes {', '.join(sorted(known))}"))


def _overrides(flags: list[str]) -> dict[str, Any]:
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


def _positive_int(value: Any, where: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise RecpostError(f"{where} must be an integer >= 1 (got {value!r})")


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
