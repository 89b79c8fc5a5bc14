"""The settings a shipped study trains each method with, read from its configs, for the scale benchmark.

``recpost experiment --config experiments/paper_<data>.yaml`` fits each method with, in order: the
pretrain config (data, backbone, trainer), the study's ``backbone:`` config, the method's config, the
study's ``posttrain_overrides`` and the method's ``overrides``. The benchmark composes the same
``model.init_args`` from the same files (what a stage's command line would give jsonargparse), so its step
times are those of the shipped settings: full or sampled softmax, chunked scoring, the KL estimator.

(The bench layer sits below ``recpost.experiment`` and does not import it; only the YAML keys the
experiment reads are read here: ``pretrain_config``, ``backbone``, ``posttrain_overrides``, ``methods``,
``reward_model``.)
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import recpost
from recpost.core.errors import RecpostError

CONFIGS = Path(recpost.__file__).resolve().parent / "configs"
# a synthetic preset -> the pretrain config and the paper study that ship for that data set
SHIPPED = {
    "ml20m": ("pretrain/ml20m.yaml", "experiments/paper_ml20m.yaml"),
    "books": ("pretrain/amazon_books.yaml", "experiments/paper_amazon_books.yaml"),
}
MODEL_ARG = "--model.init_args."


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, nested dictionaries merged (as jsonargparse composes configs)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _model(path: Path) -> tuple[str | None, dict]:
    model = _yaml(path).get("model") or {}
    return model.get("class_path"), model.get("init_args") or {}


def _overrides(args: list[str]) -> dict:
    """``--model.init_args.<key>=<value>`` command-line settings as a dict (other flags are trainer/data ones)."""
    out = {}
    for arg in args:
        if arg.startswith(MODEL_ARG) and "=" in arg:
            key, value = arg[len(MODEL_ARG):].split("=", 1)
            out[key] = yaml.safe_load(value)
    return out


@dataclass
class MethodSettings:
    """One stage's method: its class and ``init_args`` as the study would fit it (checkpoints not filled in)."""

    name: str
    class_path: str
    init_args: dict
    reward_ensemble: int = 0  # reward models the study trains for this method's ensemble
    epochs: int | None = None
    config: Path | None = None  # the method's config, whose data: section (e.g. batch_size) applies too

    @property
    def method_class(self) -> type:
        module, name = self.class_path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)


@dataclass
class ShippedStudy:
    """A data set's shipped pretraining and paper study, as the benchmark needs them."""

    pretrain_config: Path
    study_config: Path
    pretrain: MethodSettings
    methods: dict[str, MethodSettings] = field(default_factory=dict)  # the study's base and post-training stages
    eval_min_rating: float | None = None
    judges: int = 0


def shipped_study(shape: str, methods: list[str] | None = None) -> ShippedStudy:
    """The settings of ``configs/pretrain/<data>.yaml`` and of every method of ``experiments/paper_<data>.yaml``
    (and of any other method config in ``configs/method/``, with the study's shared overrides, when
    ``methods`` names it), for the synthetic preset ``shape``."""
    if shape not in SHIPPED:
        raise RecpostError(f"no shipped configs for the shape {shape!r}; use one of {sorted(SHIPPED)}")
    pretrain_path, study_path = (CONFIGS / p for p in SHIPPED[shape])
    study = _yaml(study_path)
    pre_class, pre_args = _model(pretrain_path)
    pretrain = MethodSettings("pretrain", pre_class, pre_args)
    base = copy.deepcopy(pre_args)
    if study.get("backbone"):
        base = _merge(base, _model(CONFIGS / "backbone" / f"{study['backbone']}.yaml")[1])
    shared = _overrides(study.get("posttrain_overrides") or [])
    specs = dict(study.get("methods") or {})
    if study.get("reward_model"):
        specs["reward_model"] = study["reward_model"]
    for name in methods or []:
        if name not in specs and (CONFIGS / "method" / f"{name}.yaml").is_file():
            specs[name] = {"config": f"../method/{name}.yaml"}
    out = {"base": MethodSettings("base", pre_class, _merge(base, _overrides(study.get("pretrain_overrides") or [])))}
    for name, spec in specs.items():
        if methods is not None and name not in methods:
            continue
        config = (study_path.parent / spec["config"]).resolve()
        class_path, args = _model(config)
        ensemble = (spec.get("reward_ensemble") or {}).get("count", 0) if isinstance(spec.get("reward_ensemble"), dict) else 0
        init_args = _merge(_merge(base, args), {**shared, **_overrides(spec.get("overrides") or [])})
        out[name] = MethodSettings(name, class_path, init_args, ensemble, spec.get("epochs", study.get("posttrain_epochs")),
                                   config)
    judges = study.get("judges") or {}
    return ShippedStudy(pretrain_path, study_path, pretrain, out, study.get("eval_min_rating"),
                        judges.get("count", 0) if isinstance(judges, dict) else 0)
