"""The experiment config, read and checked once: every mistake is one line before anything runs.

An experiment YAML names the pretrain config, the methods with their grids, the reward model and the
budgets; :func:`load_study` turns it into a :class:`Study`. Whether a method takes or needs a reward
model is asked of the method class its config names (``takes_reward_model``,
``needs_reward_model``), not guessed from the keys of its YAML. Every stage's model settings (its
config's ``model.init_args``, the ``--model.init_args.*`` overrides, the grid point) are checked the same
way: each key against the settings the class takes (``setting_defaults``, with the closest one
suggested), each value against the class's rules (``check_settings``), so that ``grid: {lam: [0]}`` or a
misspelt grid key stops before pretraining, not after.

Besides the study's reward model (and its evaluator), a study may ask for **judges** (``judges: {count:
K, kinds: [...]}``: K rating models trained independently, each on its own seed and bootstrap resample of the
users, of kinds that share less and less with the training RM (``recpost.experiment.judging``), that score
every policy: ``judge_reward@10``) and, per method, a **reward ensemble** (``reward_ensemble: {count: K}``:
the study's RM and K - 1 more, each on its own seed and bootstrap resample, for RS-DPO).
``eval_min_rating`` applies the paper's test protocol to
every policy (selection and test) and adds a second test over all targets. A ``quick:`` section scales the
study down for ``--quick`` (fewer seeds, epochs, grid points, judges), keeping every method and stage. With
``trials: N`` every method runs N settings drawn from its ``space:`` (the learning rate included), the same
budget for each (:mod:`.trials`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from recpost.core.configs import find_config, shipped, shipped_in
from recpost.core.errors import RecpostError
from recpost.experiment.judging import JudgeSpec, check_judges, parse_judges
from recpost.experiment.settings import accepted, check_settings, keys_of, override_settings, read_method_class
from recpost.experiment.trials import assign_trials
from recpost.methods import RecModule

DEFAULT_CONFIG = "experiments/sim.yaml"  # a shipped config's name (recpost.core.configs): runs from any folder
STUDY_KEYS = {"name", "pretrain_config", "backbone", "data", "pretrained", "methods", "seeds", "posttrain_epochs",
              "pretrain_overrides", "posttrain_overrides", "monitor", "monitor_mode", "reward_model", "judges",
              "eval_min_rating", "wandb", "quick", "trials", "trial_seed"}
METHOD_KEYS = {"config", "grid", "space", "epochs", "overrides", "reward_ensemble"}
RM_KEYS = {"config", "epochs", "overrides", "evaluator"}
COUNT_KEYS = {"count"}
# What a quick: section may change (--quick): budgets and grids, never the methods, stages or protocol.
QUICK_KEYS = {"seeds", "posttrain_epochs", "pretrain_overrides", "posttrain_overrides", "reward_model", "judges", "methods",
              "trials"}
QUICK_SECTION_KEYS = {"reward_model": {"epochs", "overrides"}, "judges": {"count", "kinds", "epochs", "overrides"}}
QUICK_METHOD_KEYS = {"grid", "space", "epochs", "overrides", "reward_ensemble"}
QUICK_SUFFIX = "_quick"
# Row names of the stages the runner adds itself: a study's method cannot take them.
RESERVED_METHODS = {"base", "reward_model", "eval_reward_model", "reward_ensemble", "judge"}


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
    reward_ensemble: int | None = None  # K: train against the study's RM and K - 1 more (other seeds)
    space: dict[str, list] | None = None  # a study with trials: the settings its trials are drawn from
    trial_settings: list[dict] = field(default_factory=list)  # ... and those drawn (recpost.experiment.trials)

    def settings(self) -> list[dict]:
        """The drawn trials in a study with ``trials``; else every point of the grid (one empty setting without
        a grid), in the grid's key order."""
        if self.trial_settings:
            return [dict(s) for s in self.trial_settings]
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
        return self.method_class.needs_reward_model({**self.init_args, **self.ensemble_setting(), **setting})

    def ensemble_setting(self, members: list[str] | None = None) -> dict[str, Any]:
        """``{reward_ensemble: members}`` when the study trains an ensemble for this method (stand-in names for
        the checks before anything is trained), else ``{}``."""
        if not self.reward_ensemble:
            return {}
        return {"reward_ensemble": members or [f"<reward ensemble member {m}>" for m in range(self.reward_ensemble)]}


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
    judges: JudgeSpec | None = None
    eval_min_rating: float | None = None  # the paper's protocol for the policies; all targets tested as well
    backbone_config: Path | None = None
    wandb: dict | None = field(default_factory=dict)
    world_config: Path | None = None  # a regime map's simulated world (``data:`` settings), composed last
    trials: int | None = None  # settings tried per method and seed (each method's space: recpost.experiment.trials)

    @property
    def base_configs(self) -> list[Path]:
        """The config files every stage starts from, in the order they compose (pretrain, backbone, data, world)."""
        return [self.pretrain_config, *(p for p in (self.backbone_config, self.data_config, self.world_config) if p)]

    @property
    def ensemble_size(self) -> int:
        """Reward models per seed that the methods' ``reward_ensemble`` need (the study's RM among them)."""
        return max((m.reward_ensemble or 0 for m in self.methods), default=0)


def load_study(path: str, quick: bool = False) -> Study:
    """Read and check an experiment YAML; raises :class:`RecpostError` with one line on the first mistake.
    ``quick``: apply its ``quick:`` section (the study scaled down, every method and stage kept)."""
    cfg_path = resolve_path(path, Path.cwd())
    return parse_study(read_config(cfg_path), cfg_path, quick)


def read_config(cfg_path: Path) -> dict:
    """The experiment YAML at ``cfg_path`` as a mapping (a regime map reads it too, then drops ``worlds``)."""
    raw = yaml.safe_load(cfg_path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RecpostError(f"{cfg_path}: an experiment config is a mapping (name, pretrain_config, methods, ...)")
    return raw


def parse_study(raw: dict, cfg_path: Path, quick: bool = False) -> Study:
    """:func:`load_study` of a config already read (``raw``; its paths are relative to ``cfg_path``)."""
    base = cfg_path.parent
    _keys(raw, STUDY_KEYS, str(cfg_path))
    if "pretrain_config" not in raw or not raw.get("methods"):
        raise RecpostError(f"{cfg_path}: needs pretrain_config and at least one entry under methods")
    scaled = _quick(raw, cfg_path)  # checked whether or not --quick is given: a typo there stops here too
    if quick:
        if scaled is None:
            raise RecpostError(f"{cfg_path} has no quick: section, so --quick cannot scale it down (--quick applies a "
                               "study's own quick: section; the paper studies and sim_regimes.yaml have one); run it "
                               "without --quick, or add one (see configs/experiments/paper_ml100k.yaml)")
        raw = scaled
    for name in raw["methods"]:
        if name in RESERVED_METHODS:
            raise RecpostError(f"{cfg_path}: methods.{name}: {name!r} names a stage the runner adds itself; "
                               f"call the method something else (reserved: {', '.join(sorted(RESERVED_METHODS))})")
    methods = [_method(name, spec or {}, cfg_path) for name, spec in raw["methods"].items()]
    trials = assign_trials(methods, raw.get("trials"), raw.get("trial_seed", 0), list(raw.get("posttrain_overrides", [])),
                           str(cfg_path))  # every method's settings drawn from its space: the same budget for each
    rm = None
    if raw.get("reward_model"):
        spec = raw["reward_model"]
        _keys(spec, RM_KEYS, f"{cfg_path}: reward_model")
        rm = RewardModelSpec(resolve_path(spec.get("config", "configs/method/reward_model.yaml"), base),
                             spec.get("epochs"), list(spec.get("overrides", [])), bool(spec.get("evaluator", False)))
    needing = [m.name for m in methods if any(m.needs_reward_model(s) for s in m.settings())]
    if needing and rm is None:
        raise RecpostError(f"{cfg_path}: methods {needing} train against a reward model; add a reward_model: "
                           "section (e.g. reward_model: {config: ../method/reward_model.yaml})")
    ensembles = [m.name for m in methods if m.reward_ensemble]
    if ensembles and rm is None:
        raise RecpostError(f"{cfg_path}: methods {ensembles} ask for a reward_ensemble, whose members are trained like "
                           "the study's reward model (other seeds); add a reward_model: section")
    judges = _judges(raw.get("judges"), rm, cfg_path)
    for key in ("seeds", "posttrain_epochs"):
        _positive_int(raw.get(key, 1), f"{cfg_path}: {key}")
    for label, spec in [*((m.name, m) for m in methods), ("reward_model", rm), ("judges", judges)]:
        if spec is not None and spec.epochs is not None:
            _positive_int(spec.epochs, f"{cfg_path}: {label}.epochs")
    eval_min_rating = raw.get("eval_min_rating")
    rating = isinstance(eval_min_rating, (int, float)) and not isinstance(eval_min_rating, bool)
    if eval_min_rating is not None and not rating:
        raise RecpostError(f"{cfg_path}: eval_min_rating must be a rating (e.g. 4.5, the paper's protocol) or null "
                           f"(got {eval_min_rating!r})")
    data_config = _data_config(raw.get("data"), cfg_path)
    backbone_config = _named_config("backbone", raw.get("backbone"), cfg_path)
    _check_stage_settings(cfg_path, resolve_path(raw["pretrain_config"], base), list(raw.get("pretrain_overrides", [])),
                          list(raw.get("posttrain_overrides", [])), methods, rm, judges,
                          [p for p in (backbone_config, data_config) if p])
    pretrained = raw.get("pretrained") or []
    pretrained = [resolve_path(p, base) for p in ([pretrained] if isinstance(pretrained, str) else pretrained)]
    wandb = raw.get("wandb", {})
    if wandb not in (False, None) and not isinstance(wandb, dict):
        raise RecpostError(f"{cfg_path}: wandb must be false or a mapping (project, entity, group)")
    return Study(
        name=raw.get("name", cfg_path.stem) + (QUICK_SUFFIX if quick else ""),
        pretrain_config=resolve_path(raw["pretrain_config"], base), methods=methods, path=cfg_path, data_config=data_config, pretrained=pretrained,
        seeds=int(raw.get("seeds", 1)), posttrain_epochs=int(raw.get("posttrain_epochs", 10)),
        pretrain_overrides=list(raw.get("pretrain_overrides", [])),
        posttrain_overrides=list(raw.get("posttrain_overrides", [])), monitor=raw.get("monitor", "val/ndcg@10"),
        monitor_mode=_mode(raw.get("monitor_mode", "max"), cfg_path), reward_model=rm, judges=judges,
        eval_min_rating=None if eval_min_rating is None else float(eval_min_rating), backbone_config=backbone_config,
        wandb=None if wandb in (False, None) else dict(wandb), trials=trials,
    )


def _method(name: str, spec: dict, cfg_path: Path) -> MethodSpec:
    _keys(spec, METHOD_KEYS, f"{cfg_path}: methods.{name}")
    if "config" in spec:
        config = resolve_path(spec["config"], cfg_path.parent)
    elif shipped(f"method/{name}.yaml") is not None:
        config = shipped(f"method/{name}.yaml")
    else:
        raise RecpostError(f"{cfg_path}: unknown method {name!r}; give methods.{name}.config or use one of "
                           f"{_known('method')}")
    grid = spec.get("grid") or {}
    if "grid" in spec and not grid:
        raise RecpostError(f"{cfg_path}: methods.{name}.grid is empty; remove it or give each key a non-empty list")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise RecpostError(f"{cfg_path}: methods.{name}.grid.{key} must be a non-empty list")
    cls, init_args = read_method_class(f"methods.{name}", config, cfg_path)
    ensemble = _count(spec.get("reward_ensemble"), f"{cfg_path}: methods.{name}.reward_ensemble", 2,
                      "e.g. reward_ensemble: {count: 3} (the study's reward model and 2 more seeds)")
    if ensemble and "reward_ensemble" not in cls.setting_defaults():
        raise RecpostError(f"{cfg_path}: methods.{name}.reward_ensemble: {cls.__name__} takes no reward "
                           "ensemble; it is for recpost.methods.DPO (configs/method/rs_dpo.yaml)")
    return MethodSpec(name, config, cls, init_args, grid, spec.get("epochs"), list(spec.get("overrides", [])),
                      ensemble, spec.get("space"))


def _count(spec: Any, where: str, low: int, example: str, keys: set[str] = COUNT_KEYS) -> int | None:
    """The ``count`` of a ``{count: K, ...}`` section (``None`` without one), an integer >= ``low``."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise RecpostError(f"{where} must be a mapping with a count; {example}")
    _keys(spec, keys, where)
    count = spec.get("count")
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= low):
        raise RecpostError(f"{where}.count must be an integer >= {low} (got {count!r}); {example}")
    return count


def _judges(spec: Any, rm: RewardModelSpec | None, cfg_path: Path) -> JudgeSpec | None:
    """``judges: {count, kinds, config, epochs, overrides}`` (``recpost.experiment.judging``); config, epochs and
    overrides default to the reward model's."""
    return parse_judges(spec, rm.config if rm else None, rm.epochs if rm else None, rm.overrides if rm else [],
                        f"{cfg_path}: judges", lambda path: resolve_path(path, cfg_path.parent))


def _quick(raw: dict, cfg_path: Path) -> dict | None:
    """The study with its ``quick:`` section applied (``None`` without one): its values replace the study's
    (``reward_model``, ``judges`` and each method key by key); it may not add or drop methods or stages."""
    quick = raw.get("quick")
    if quick is None:
        return None
    where = f"{cfg_path}: quick"
    if not isinstance(quick, dict):
        raise RecpostError(f"{where} must be a mapping of the settings --quick changes ({', '.join(sorted(QUICK_KEYS))})")
    _keys(quick, QUICK_KEYS, where)
    out = {k: v for k, v in raw.items() if k != "quick"}
    for key, value in quick.items():
        if key in QUICK_SECTION_KEYS:
            if not isinstance(value, dict) or not raw.get(key):
                raise RecpostError(f"{where}.{key} scales down the study's {key}: section, so it needs one and a "
                                   "mapping here (--quick keeps the study's stages)")
            _keys(value, QUICK_SECTION_KEYS[key], f"{where}.{key}")
            out[key] = {**raw[key], **value}
        elif key == "methods":
            if not isinstance(value, dict):
                raise RecpostError(f"{where}.methods must map method names to their scaled-down settings")
            out["methods"] = dict(raw["methods"])
            for name, spec in value.items():
                if name not in raw["methods"]:
                    raise RecpostError(f"{where}.methods.{name}: no such method in the study; --quick keeps the "
                                       f"study's methods ({', '.join(raw['methods'])}) and only scales them down")
                if not isinstance(spec, dict):
                    raise RecpostError(f"{where}.methods.{name} must be a mapping ({', '.join(sorted(QUICK_METHOD_KEYS))})")
                _keys(spec, QUICK_METHOD_KEYS, f"{where}.methods.{name}")
                out["methods"][name] = {**(raw["methods"][name] or {}), **spec}
        else:
            out[key] = value
    return out


def _check_stage_settings(cfg_path: Path, pretrain: Path, pretrain_overrides: list[str], posttrain_overrides: list[str],
                          methods: list[MethodSpec], rm: RewardModelSpec | None, judges: JudgeSpec | None,
                          configs: list[Path]) -> None:
    """Every stage's model settings, as its ``recpost fit`` will compose them, through the method class's
    checks: the base model, the reward model and the judges, each method at each grid point (``configs``: the
    backbone and data configs composed after the pretrain config)."""
    base_class, inherited = read_method_class("pretrain_config", pretrain, cfg_path)  # later configs keep its settings
    check_settings(base_class, {**inherited, **override_settings(pretrain_overrides)}, f"{cfg_path}: pretrain_config {pretrain}")
    if rm is not None:
        rm_class, rm_args = read_method_class("reward_model", rm.config, cfg_path)
        keys_of(rm_class, rm_args, f"{rm.config}: model.init_args")
        keys_of(rm_class, override_settings(rm.overrides), f"{cfg_path}: reward_model.overrides")
        check_settings(rm_class, {**accepted(rm_class, inherited), **rm_args, **override_settings(posttrain_overrides),
                                   **override_settings(rm.overrides)}, f"{cfg_path}: reward_model")
    if judges is not None:
        check_judges(judges, inherited, posttrain_overrides, cfg_path, [pretrain, *configs])
    judge_arg = {"judges": [f"<judge {k}>" for k in range(judges.count)]} if judges is not None else {}
    for method in methods:
        cls = method.method_class
        keys_of(cls, method.init_args, f"{method.config}: model.init_args")
        keys_of(cls, override_settings(method.overrides), f"{cfg_path}: methods.{method.name}.overrides")
        keys_of(cls, method.grid, f"{cfg_path}: methods.{method.name}.grid")
        keys_of(cls, method.space or {}, f"{cfg_path}: methods.{method.name}.space")
        rm_arg = {"reward_model": "<the study's reward model>"} if rm is not None and method.takes_reward_model else {}
        for setting in method.settings():
            shown = f" ({', '.join(f'{k}={v}' for k, v in setting.items())})" if setting else ""
            check_settings(cls, {**accepted(cls, inherited), **method.init_args, **override_settings(posttrain_overrides),
                                  **override_settings(method.overrides), **rm_arg, **method.ensemble_setting(), **judge_arg,
                                  **setting}, f"{cfg_path}: methods.{method.name}{shown}")


def _positive_int(value: Any, where: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise RecpostError(f"{where} must be an integer >= 1 (got {value!r})")


def _named_config(folder: str, name: Any, cfg_path: Path) -> Path | None:
    """``<folder>:`` names a shipped config (``configs/<folder>/<name>.yaml``) or a path to one."""
    if not name:
        return None
    name = str(name)
    if name in _known(folder):
        return shipped(f"{folder}/{name}.yaml")
    if name.endswith((".yaml", ".yml")):
        return resolve_path(name, cfg_path.parent)
    raise RecpostError(f"{cfg_path}: unknown {folder} {name!r}; use one of {_known(folder)} or a config path")


def _data_config(data: Any, cfg_path: Path) -> Path | None:
    """``data:`` names a shipped data config (``ml100k``, ``sim``, ...) or a path to one."""
    if not data:
        return None
    data = str(data)
    if data in _known("data"):
        return shipped(f"data/{data}.yaml")
    if data.endswith((".yaml", ".yml")):
        return resolve_path(data, cfg_path.parent)
    raise RecpostError(f"{cfg_path}: unknown dataset {data!r}; use one of {_known('data')} or a data config path")


def resolve_path(path: str, base: Path) -> Path:
    """A path in an experiment config: relative to the config's folder (``base``), else to the working
    directory, else a shipped config's name (``../method/sft.yaml`` of a copied-out config finds the shipped
    one); one error line naming where it looked."""
    return find_config(path, *dict.fromkeys((base, Path.cwd())))


def _known(folder: str) -> list[str]:
    return shipped_in(folder)


def _keys(raw: dict, allowed: set[str], where: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise RecpostError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _mode(mode: str, where: Path) -> str:
    if mode not in ("max", "min"):
        raise RecpostError(f"{where}: monitor_mode must be max or min (got {mode!r})")
    return mode
