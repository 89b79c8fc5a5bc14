"""The checkpoint format and the loaders: how weights leave and enter recpost.

A recpost checkpoint is what Lightning's ``ModelCheckpoint`` writes: a dict with ``state_dict`` (the
method module's weights: ``backbone.*``, and the method's own parts, e.g. a reward model's
``head.*``) and ``hyper_parameters`` (the method's init arguments, among them ``n_items``,
``max_len``, ``backbone`` (a :class:`~recpost.models.BackboneConfig`) and ``item_map_hash``, which
identifies the item catalog). Everything here loads with ``torch.load(weights_only=True)``, so a
checkpoint can carry no code.

Every checkpoint that enters recpost goes through :func:`read_checkpoint` (a one-line error when it is
missing or unreadable) and :func:`check_catalog` (a one-line error when it was trained on another
catalog). Nobody else builds or reads checkpoint dicts: :func:`save_checkpoint` writes one outside a
Trainer (``recpost bench``, tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recpost.errors import RecpostError
from recpost.models import BackboneConfig, RatingHead, RatingModel, build_backbone, freeze

TRAIN_A_REWARD_MODEL = (
    "a reward model is needed: train one with `recpost fit --config <pretrain.yaml> --config "
    "configs/method/reward_model.yaml` and pass its best.ckpt"
)
PASS_A_FIT_CHECKPOINT = "pass the best.ckpt of a `recpost fit` run"


def save_checkpoint(module: nn.Module, path: str | Path) -> Path:
    """Write ``module``'s weights and hyperparameters (a LightningModule's ``hparams``) as a checkpoint
    that every loader here reads (what ``ModelCheckpoint`` writes, minus the trainer state)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def read_checkpoint(path: str | Path, what: str, how: str = PASS_A_FIT_CHECKPOINT) -> dict:
    """Load a checkpoint with ``weights_only=True``; one-line ``RecpostError`` if missing or unreadable.

    ``what`` names the config key (e.g. ``model.init_from``), ``how`` says how to get a good one.
    """
    ckpt_path = Path(path).expanduser()
    if not ckpt_path.is_file():
        raise RecpostError(f"{what}: checkpoint not found: {ckpt_path}; {how}")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a recpost checkpoint"
        raise RecpostError(f"{what}: cannot load {ckpt_path} as a checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise RecpostError(f"{what}: {ckpt_path} is not a recpost checkpoint (no state_dict); {how}")
    return ckpt


def check_catalog(hparams: Mapping[str, Any], item_map_hash: str, where: str | Path) -> None:
    """Refuse weights trained on another item catalog: their ids would mean other items."""
    theirs = hparams.get("item_map_hash")
    if theirs and item_map_hash and theirs != item_map_hash:
        raise RecpostError(
            f"{where} was trained on another item catalog (id map {theirs}, data has {item_map_hash}); use a "
            "checkpoint trained on this data set and preprocessing, or retrain"
        )


def backbone_config(hparams: Mapping[str, Any]) -> BackboneConfig:
    """The checkpoint's backbone architecture (a dataclass, or a dict in hand-written checkpoints)."""
    cfg = hparams.get("backbone") or BackboneConfig()
    return BackboneConfig(**cfg) if isinstance(cfg, Mapping) else cfg


def weights_under(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` under ``prefix`` (e.g. ``backbone.``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_backbone_weights(backbone: nn.Module, path: str | Path, item_map_hash: str, what: str = "model.init_from") -> None:
    """Copy the backbone weights of a recpost checkpoint (any method) into ``backbone``."""
    ckpt_path = Path(path).expanduser()
    ckpt = read_checkpoint(path, what)
    check_catalog(ckpt.get("hyper_parameters", {}), item_map_hash, ckpt_path)
    state = weights_under(ckpt["state_dict"], "backbone.")
    if not state:
        raise RecpostError(f"{what}: {ckpt_path} holds no backbone weights; is it a recpost checkpoint?")
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RecpostError(
            f"{what}: {ckpt_path} has another backbone architecture ({str(exc).splitlines()[0]}); "
            "use the same model.backbone settings as the run that wrote it"
        ) from None


def load_reward_model(path: str | Path, item_map_hash: str, what: str = "model.reward_model") -> RatingModel:
    """A frozen :class:`~recpost.models.RatingModel` from a ``RewardModel`` checkpoint (its architecture
    from the checkpoint's hyperparameters). One-line ``RecpostError`` when the file is missing, is not a
    reward-model checkpoint, or was trained on another item catalog than ``item_map_hash``."""
    ckpt_path = Path(path).expanduser()
    ckpt = read_checkpoint(path, what, TRAIN_A_REWARD_MODEL)
    hp, state = ckpt.get("hyper_parameters", {}), ckpt["state_dict"]
    if not any(k.startswith("head.") for k in state) or "prior_count" not in hp:
        raise RecpostError(f"{what}: {ckpt_path} is not a reward-model checkpoint (no rating head); {TRAIN_A_REWARD_MODEL}")
    check_catalog(hp, item_map_hash, f"{what}: {ckpt_path}")
    backbone = build_backbone(backbone_config(hp), n_items=hp["n_items"], max_len=hp["max_len"])
    model = RatingModel(backbone, RatingHead(hp["n_items"], backbone.item_weights().shape[1], hp["prior_count"]))
    try:
        model.load_state_dict({k: v for k, v in state.items() if k.startswith(("backbone.", "head."))}, strict=True)
    except RuntimeError as exc:
        raise RecpostError(f"{what}: {ckpt_path} does not match its own hyperparameters ({str(exc).splitlines()[0]})") from None
    return freeze(model)
