"""A study's judge panel: which judges score the policies, and how each one is trained.

A judge is only evidence of reward hacking if it could have disagreed with the reward model the methods
train against. Reward models continued from the same base checkpoint, with the same item-bias start, on
the same users, err where the training RM errs (their errors correlated 0.99 with its own on ML-1M), so
the panel mixes **kinds** of judges that share less and less with it:

- ``same_base``: the study's reward-model config continued from the base checkpoint, like the training RM
  (another seed and bootstrap resample of the users): the panel before issue 26, kept for comparison;
- ``scratch``: the same config trained from scratch, no base checkpoint;
- ``other_backbone``: the same config on the other backbone (HSTU for a SASRec study and vice versa,
  ``configs/backbone/<name>.yaml``), from scratch;
- ``mf``: a matrix-factorisation rating model (``recpost.methods.MFRewardModel``,
  ``configs/method/mf_reward_model.yaml``): no sequence encoder at all.

Every judge trains on its own bootstrap resample of the users with its own seed (``roles.role_seed``).
The study's ``judges:`` section::

    judges:
      count: 3                                  # judge k is of kind kinds[k % len(kinds)]; default len(kinds)
      kinds: [scratch, other_backbone, {kind: mf, epochs: 30}]   # default [same_base]
      epochs: 10                                # the reward-model kinds' defaults: the study's reward model's
      overrides: []

A kind given as a mapping (``kind``, ``config``, ``epochs``, ``overrides``) sets that judge's own training;
the panel's ``config``, ``epochs`` and ``overrides`` (which default to the reward model's) apply to the
reward-model kinds only, since an MF model takes other settings: ``mf`` defaults to its own config's.
An old ``judges: {count: K}`` is K ``same_base`` judges, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recpost.core.errors import RecpostError
from recpost.experiment.settings import accepted, check_settings, keys_of, override_settings, read_method_class
from recpost.methods import MFRewardModel
from recpost.methods.rating_base import RatingModule

JUDGE_KINDS = ("same_base", "scratch", "other_backbone", "mf")
RM_KINDS = ("same_base", "scratch", "other_backbone")  # trained from the study's reward-model config
JUDGE_KEYS = {"count", "kinds", "config", "epochs", "overrides"}
KIND_KEYS = {"kind", "config", "epochs", "overrides"}
SHIPPED = Path(__file__).resolve().parents[1] / "configs"  # recpost/configs
MF_CONFIG = SHIPPED / "method" / "mf_reward_model.yaml"
OTHER_BACKBONE = {"sasrec": "hstu", "hstu": "sasrec"}
EXAMPLE = "e.g. judges: {kinds: [scratch, other_backbone, mf]}"


@dataclass(frozen=True)
class Judge:
    """One judge of the panel: its kind and what its fit composes (``config``, then ``--trainer.max_epochs
    epochs`` when given, then the study's post-training overrides and ``overrides``)."""

    kind: str
    config: Path
    epochs: int | None = None
    overrides: tuple[str, ...] = ()

    @property
    def continued(self) -> bool:
        """Starts from the base checkpoint (``init_from``), as the study's reward model does."""
        return self.kind == "same_base"


@dataclass
class JudgeSpec:
    """The panel: ``count`` judges, judge ``k`` of kind ``kinds[k % len(kinds)]`` (see the module docstring)."""

    count: int
    config: Path
    epochs: int | None = None
    overrides: list[str] = field(default_factory=list)
    kinds: tuple[dict, ...] = ({"kind": "same_base"},)

    def members(self) -> list[Judge]:
        """The judges, in order."""
        return [self._judge(self.kinds[k % len(self.kinds)]) for k in range(self.count)]

    def _judge(self, spec: dict) -> Judge:
        kind = spec["kind"]
        panel = kind in RM_KINDS  # the panel's settings are the reward model's: not an MF model's
        config = spec.get("config") or (self.config if panel else MF_CONFIG)
        epochs = spec.get("epochs", self.epochs if panel else None)
        overrides = spec.get("overrides", self.overrides if panel else [])
        return Judge(kind, Path(config), epochs, tuple(overrides))


def parse_judges(spec: Any, rm_config: Path | None, rm_epochs: int | None, rm_overrides: Sequence[str],
                 where: str, resolve: Callable[[str], Path]) -> JudgeSpec | None:
    """The study's ``judges:`` section (``None`` without one); one ``RecpostError`` line on the first mistake.
    ``resolve`` finds a config path named in it (relative to the experiment file)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise RecpostError(f"{where} must be a mapping with a count or kinds; {EXAMPLE}")
    unknown = set(spec) - JUDGE_KEYS
    if unknown:
        raise RecpostError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(JUDGE_KEYS)}")
    kinds = tuple(_kind(entry, f"{where}.kinds[{i}]", resolve) for i, entry in enumerate(_list(spec, where)))
    count = spec.get("count", len(kinds) if kinds else None)
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        raise RecpostError(f"{where}.count must be an integer >= 1 (got {count!r}); {EXAMPLE}")
    config = resolve(str(spec["config"])) if spec.get("config") else (rm_config or SHIPPED / "method" / "reward_model.yaml")
    return JudgeSpec(count, config, spec.get("epochs", rm_epochs), list(spec.get("overrides", rm_overrides)),
                     kinds or ({"kind": "same_base"},))


def _list(spec: dict, where: str) -> list:
    kinds = spec.get("kinds")
    if kinds is None:
        return []
    if not isinstance(kinds, list) or not kinds:
        raise RecpostError(f"{where}.kinds must be a non-empty list of judge kinds ({', '.join(JUDGE_KINDS)}); {EXAMPLE}")
    return kinds


def _kind(entry: Any, where: str, resolve: Callable[[str], Path]) -> dict:
    """One entry of ``kinds``: a kind's name, or a mapping with ``kind`` and its own training settings."""
    spec = {"kind": entry} if isinstance(entry, str) else entry
    if not isinstance(spec, dict) or spec.get("kind") not in JUDGE_KINDS:
        shown = spec.get("kind") if isinstance(spec, dict) else entry
        raise RecpostError(f"{where}: unknown judge kind {shown!r}; use one of {', '.join(JUDGE_KINDS)}, or a mapping "
                           "such as {kind: mf, epochs: 30}")
    unknown = set(spec) - KIND_KEYS
    if unknown:
        raise RecpostError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(KIND_KEYS)}")
    epochs = spec.get("epochs")
    if epochs is not None and not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1):
        raise RecpostError(f"{where}.epochs must be an integer >= 1 (got {epochs!r})")
    if "overrides" in spec and not isinstance(spec["overrides"], list):
        raise RecpostError(f"{where}.overrides must be a list of command-line flags")
    return {**spec, **({"config": resolve(str(spec["config"]))} if spec.get("config") else {})}


def study_backbone(configs: Sequence[Path]) -> str:
    """The backbone name the study's stages compose: the last ``model.init_args.backbone.name`` of its base
    configs (pretrain, backbone, data, world), else the default ``sasrec``."""
    name = "sasrec"
    for path in configs:
        model = (yaml.safe_load(Path(path).read_text()) or {}).get("model") or {}
        backbone = ((model.get("init_args") or {}) if isinstance(model, dict) else {}).get("backbone") or {}
        if isinstance(backbone, dict) and backbone.get("name"):
            name = str(backbone["name"])
    return name


def other_backbone_config(configs: Sequence[Path]) -> Path:
    """The shipped config of the other backbone than the study's (``configs/backbone/hstu.yaml`` for SASRec)."""
    name = study_backbone(configs)
    if name not in OTHER_BACKBONE:
        raise RecpostError(f"an other_backbone judge needs a study on {' or '.join(OTHER_BACKBONE)} (its backbone is "
                           f"{name!r}); use the kinds scratch or mf")
    return SHIPPED / "backbone" / f"{OTHER_BACKBONE[name]}.yaml"


def judge_configs(judge: Judge, base_configs: Sequence[Path]) -> list[Path]:
    """The configs a judge's fit composes after the study's base configs: its own, then for ``other_backbone``
    the other backbone's (so that it replaces the study's architecture)."""
    return [judge.config, *([other_backbone_config(base_configs)] if judge.kind == "other_backbone" else [])]


def check_judges(panel: JudgeSpec, inherited: dict[str, Any], posttrain_overrides: list[str], where: Path,
                 base_configs: Sequence[Path]) -> None:
    """Every judge's settings as its ``recpost fit`` will compose them, through its class's checks: a rating
    model (``RewardModel`` or ``MFRewardModel``), keys it takes, values it accepts, a backbone to swap."""
    for k, judge in enumerate(panel.members()):
        label = f"{where}: judges (judge {k}, {judge.kind})"
        cls, args = read_method_class("judges", judge.config, where)
        if not issubclass(cls, RatingModule):
            raise RecpostError(f"{label}: {judge.config} is not a rating model ({cls.__name__}); use "
                               "../method/reward_model.yaml or ../method/mf_reward_model.yaml")
        if (judge.kind == "mf") != issubclass(cls, MFRewardModel):
            raise RecpostError(f"{label}: {judge.config} ({cls.__name__}) is not a judge of kind {judge.kind}; the mf "
                               "kind takes an MFRewardModel config, the others a RewardModel config")
        if judge.kind == "other_backbone":
            judge_configs(judge, base_configs)
        keys_of(cls, args, f"{judge.config}: model.init_args")
        keys_of(cls, override_settings(list(judge.overrides)), f"{label}.overrides")
        check_settings(cls, {**accepted(cls, inherited), **args, **override_settings(posttrain_overrides),
                             **override_settings(list(judge.overrides))}, label)
