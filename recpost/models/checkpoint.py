"""The checkpoint format and the loaders: how weights leave and enter recpost.

A recpost checkpoint is what Lightning's ``ModelCheckpoint`` writes: a dict with ``state_dict`` (the
method module's weights: ``backbone.*``, and the method's own parts, e.g. a reward model's
``head.*``) and ``hyper_parameters`` (the method's init arguments, among them ``n_items``,
``max_len``, ``backbone`` (a :class:`~recpost.models.BackboneConfig`) and ``item_map_hash``, which
identifies the item catalog), plus a ``recpost`` entry written at save time (:func:`stamp`): the
SHA-256 of the weights and the method's class path. Everything here loads with
``torch.load(weights_only=True)``, so a checkpoint can carry no code.

Every checkpoint that enters recpost (``--ckpt_path``, ``init_from``, ``reward_model``,
``eval_reward_model``, ``recpost export``) goes through :func:`read_checkpoint`, the one gate: the file
exists and is readable, loads safely, is a checkpoint, and its weights still hash to what was written
when it was saved (a file modified or corrupted since is refused; ``RECPOST_ALLOW_EDITED_CHECKPOINTS=1``
loads a deliberately edited one, with a warning). Then :func:`check_catalog` refuses weights trained on
another catalog. Nobody else builds or reads checkpoint dicts: :func:`save_checkpoint` writes one
outside a Trainer (``recpost bench``, tests), and :class:`AtomicCheckpointIO` is the Trainer's writer; both
write atomically (``recpost.core.files``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn

from recpost.core.errors import RecpostError
from recpost.core.files import write_bytes
from recpost.models import Backbone, BackboneConfig, MFRatingModel, RatingHead, RatingModel, build_backbone, freeze

TRAIN_A_REWARD_MODEL = (
    "a reward model is needed: train one with `recpost fit --config <pretrain.yaml> --config "
    "configs/method/reward_model.yaml` and pass its best.ckpt"
)
PASS_A_FIT_CHECKPOINT = "pass the best.ckpt of a `recpost fit` run"
# The checkpoint entry recpost adds at save time, and the switch that accepts weights edited since.
STAMP = "recpost"
ALLOW_EDITED = "RECPOST_ALLOW_EDITED_CHECKPOINTS"

log = logging.getLogger(__name__)
_warned: set[str] = set()


def weights_sha256(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 of the weights, in key order: each name, dtype, shape and the raw bytes of its tensor
    (so a renamed, reshaped or edited tensor changes it; any dtype, bf16 included)."""
    digest = hashlib.sha256()
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        else:
            digest.update(f"{name}\0{value!r}\0".encode())
    return digest.hexdigest()


def stamp(checkpoint: dict, class_path: str) -> dict:
    """Add the ``recpost`` entry to a checkpoint dict about to be written: the hash of its weights (checked
    by every load) and the class that wrote it."""
    checkpoint[STAMP] = {"weights_sha256": weights_sha256(checkpoint["state_dict"]), "class_path": class_path}
    return checkpoint


def verify_weights(ckpt: Mapping[str, Any], where: str, warn: bool = True) -> None:
    """Refuse weights that no longer hash to what was written at save time (one line), unless
    ``RECPOST_ALLOW_EDITED_CHECKPOINTS=1``; a checkpoint from before the hash existed loads. Both cases print
    a warning line (``warn=False``: not again, for a checkpoint that passed :func:`read_checkpoint`)."""
    entry = ckpt.get(STAMP)
    if not isinstance(entry, Mapping) or "weights_sha256" not in entry:
        if warn:
            _warn_once(f"warning: {where} has no content hash (written before recpost added one): its weights "
                       "cannot be verified")
        return
    if weights_sha256(ckpt["state_dict"]) == entry["weights_sha256"]:
        return
    if os.environ.get(ALLOW_EDITED) == "1":
        if warn:
            _warn_once(f"warning: {where}: its weights changed after it was saved; loading it anyway ({ALLOW_EDITED}=1)")
        return
    raise RecpostError(f"{where}: its weights changed after it was saved (the file was modified or corrupted); use "
                       f"an intact copy, or set {ALLOW_EDITED}=1 to load a deliberately edited checkpoint")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def save_checkpoint(module: nn.Module, path: str | Path) -> Path:
    """Write ``module``'s weights and hyperparameters (a LightningModule's ``hparams``) as a checkpoint
    that every loader here reads (what ``ModelCheckpoint`` writes, minus the trainer state), stamped
    with the hash of its weights; ``recpost test --ckpt_path`` reads it as it reads a fit's checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    class_path = f"{type(module).__module__}.{type(module).__qualname__}"
    # As LightningCLI records them (``_class_path``, dataclasses as dicts), so that ``--ckpt_path`` rebuilds the
    # method from them.
    hparams = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in module.hparams.items()}
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": {"_class_path": class_path, **hparams},
                  "pytorch-lightning_version": lightning.__version__}
    buffer = io.BytesIO()
    torch.save(stamp(checkpoint, class_path), buffer)
    write_bytes(path, buffer.getbuffer())  # atomic: a failed write leaves the previous file as it was
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic where the run folder is: ``best.ckpt`` and ``last.ckpt`` are
    written to a temporary file beside them, synced, then renamed over the old one
    (:mod:`recpost.core.files`). Lightning's own writer stages the file in the system's temp dir and moves
    it, which is a copy over the old checkpoint when the run folder is on another disk: on a full disk that
    leaves a truncated ``last.ckpt`` and destroys the previous good one. Here a failed write leaves the
    previous checkpoint loadable and ends in one line naming the checkpoint and the free space."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()  # serialised first: its size is checked against the free space before writing
        torch.save(checkpoint, buffer)
        write_bytes(path, buffer.getbuffer())


def read_checkpoint(path: str | Path, what: str, how: str = PASS_A_FIT_CHECKPOINT) -> dict:
    """Load a checkpoint through the gate (see the module docstring); one-line ``RecpostError`` on the
    first problem: missing, a folder, unreadable, empty, not a safe PyTorch file, not a checkpoint, or
    weights changed since it was saved.

    ``what`` names the config key (e.g. ``model.init_from``), ``how`` says how to get a good one.
    """
    ckpt_path = Path(path).expanduser()
    if ckpt_path.is_dir():
        raise RecpostError(f"{what}: {ckpt_path} is a folder, not a checkpoint file; {how}")
    if not ckpt_path.is_file():
        raise RecpostError(f"{what}: checkpoint not found: {ckpt_path}; {how}")
    try:
        with ckpt_path.open("rb") as fh:
            empty = not fh.read(1)
    except OSError as exc:
        raise RecpostError(f"{what}: cannot read {ckpt_path} ({exc.strerror}); check its permissions") from None
    if empty:
        raise RecpostError(f"{what}: {ckpt_path} is empty (0 bytes): an interrupted save or copy; {how}")
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it may not read: the outcome says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a recpost checkpoint"
        raise RecpostError(f"{what}: {_load_failure(ckpt_path, exc)}; {how}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise RecpostError(f"{what}: {ckpt_path} is not a recpost checkpoint (no state_dict); {how}")
    verify_weights(ckpt, f"{what} {ckpt_path}")
    return ckpt


def _load_failure(ckpt_path: Path, exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words (torch's own message spans lines)."""
    text = str(exc)
    code = re.search(r"GLOBAL (\S+)", text)
    if code is not None:
        return (f"{ckpt_path} would run Python code when loaded ({code.group(1)}); refused: recpost loads only "
                "tensors and plain values (weights_only=True)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = ""
    if isinstance(exc, (RuntimeError, pickle.UnpicklingError)) and lines:
        detail = lines[-2] if "Weights only load failed" in text and len(lines) > 1 else lines[0]
        detail = f" ({detail.split('. ')[0].rstrip('.')})"
    return f"cannot load {ckpt_path}: not a PyTorch checkpoint, or truncated or corrupted{detail}"


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


def is_mf_rating_model(hparams: Mapping[str, Any], state_dict: Mapping[str, Any]) -> bool:
    """A checkpoint of ``MFRewardModel``: its ``mf.*`` weights and ``rank`` / ``reg`` settings."""
    return "rank" in hparams and "reg" in hparams and any(k.startswith("mf.") for k in state_dict)


def load_judge(path: str | Path, item_map_hash: str, what: str = "model.judges") -> RatingModel | MFRatingModel:
    """A frozen judge: a ``RewardModel`` checkpoint (:func:`load_reward_model`) or an ``MFRewardModel`` one
    (an :class:`~recpost.models.MFRatingModel`); both answer ``predict_rewards`` and ``column_scorer``. Only
    judges may be MF models: a method trains against a sequence reward model, whose per-position states it needs."""
    ckpt = read_checkpoint(path, what, TRAIN_A_REWARD_MODEL)
    hp, state = ckpt.get("hyper_parameters", {}), ckpt["state_dict"]
    if not is_mf_rating_model(hp, state):
        return load_reward_model(path, item_map_hash, what)
    check_catalog(hp, item_map_hash, f"{what}: {Path(path).expanduser()}")
    model = MFRatingModel(hp["n_items"], hp["rank"], hp["reg"])
    try:
        model.load_state_dict(weights_under(state, "mf."), strict=True)
    except RuntimeError as exc:
        raise RecpostError(f"{what}: {Path(path).expanduser()} does not match its own hyperparameters "
                           f"({str(exc).splitlines()[0]})") from None
    return freeze(model)


def load_policy(path: str | Path, item_map_hash: str, what: str = "--policy") -> tuple[Backbone, dict[str, Any]]:
    """A frozen policy backbone (eval mode: no dropout) from the checkpoint of any next-item method (SFT,
    ExpSFT, PPO, DPO, ...) and the checkpoint's hyperparameters (``mask_history`` among them). One-line
    ``RecpostError`` when the file is missing, is a reward model, holds no matching backbone or was trained
    on another item catalog than ``item_map_hash``."""
    ckpt_path = Path(path).expanduser()
    ckpt = read_checkpoint(path, what)
    hp = dict(ckpt.get("hyper_parameters", {}))
    if "prior_count" in hp or is_mf_rating_model(hp, ckpt["state_dict"]):
        raise RecpostError(f"{what}: {ckpt_path} is a reward model (it predicts ratings, not next items); pass a "
                           "policy: SFT, ExpSFT, PPO or DPO")
    if "n_items" not in hp or "max_len" not in hp:
        raise RecpostError(f"{what}: {ckpt_path} has no n_items / max_len hyperparameters; {PASS_A_FIT_CHECKPOINT}")
    check_catalog(hp, item_map_hash, f"{what}: {ckpt_path}")
    return freeze(policy_backbone(ckpt, f"{what}: {ckpt_path}")), hp


def policy_backbone(ckpt: dict, what: str) -> Backbone:
    """The checkpoint's backbone with its weights, in eval mode (dropout off); ``what`` names the checkpoint
    in the one-line error when its weights do not fit its own backbone config."""
    hparams = ckpt.get("hyper_parameters", {})
    backbone = build_backbone(backbone_config(hparams), n_items=hparams["n_items"], max_len=hparams["max_len"])
    try:
        backbone.load_state_dict(weights_under(ckpt["state_dict"], "backbone."), strict=True)
    except RuntimeError as exc:
        raise RecpostError(f"{what} does not match its own backbone config "
                           f"({str(exc).splitlines()[0]}); is it a recpost checkpoint?") from None
    return backbone.eval()
