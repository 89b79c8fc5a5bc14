"""An exported model folder and the recommender that loads it: ``recpost.load_pretrained(DIR)``.

``recpost export`` writes a trained policy as a folder that needs no checkpoint, no config and no data
to serve (the layout is :class:`ModelFolder`, defined here and only here)::

    model.safetensors   the backbone's weights (safetensors: no pickle, loads in any framework)
    config.json         backbone config, n_items, max_len, item_map_hash, the method, the versions, the
                        scorer's inputs
    item_map.json       internal item id (1..n_items) -> the source's item id
    scorer.pt2          a ``torch.export`` program: left-padded histories -> catalog scores; runs with
                        ``torch`` alone (``torch.export.load(path).module()(items)``)
    README.md           a usage note for people

:class:`PretrainedRecommender` maps source ids to internal ids, runs the scorer, masks what the user
already had (as the evaluation does) and returns the top-k in source ids. Items the model has never
seen are reported per user and left out of the history, never an error: a new user's log always
holds items that appeared after training.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from recpost.core.errors import RecpostError
from recpost.core.timestamps import unix_seconds
from recpost.evaluation import mask_items

FORMAT = "recpost-model"
FORMAT_VERSION = 1
# What a scorer may read besides the items, in the order it takes them (``Backbone.encode``'s arguments).
SCORER_INPUTS = ("items", "ratings", "timestamps")
DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class ModelFolder:
    """An exported model's folder and the files in it."""

    path: Path

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def item_map(self) -> Path:
        return self.path / "item_map.json"

    @property
    def scorer(self) -> Path:
        return self.path / "scorer.pt2"

    @property
    def readme(self) -> Path:
        """A usage note for people (not read by recpost; folders exported before it have none)."""
        return self.path / "README.md"

    @property
    def files(self) -> tuple[Path, ...]:
        return self.weights, self.config, self.item_map, self.scorer


@dataclass
class History:
    """One user's history in source ids, oldest first (``ratings`` / ``timestamps`` aligned, or ``None``)."""

    user_id: Any
    items: list
    ratings: list[float] | None = None
    timestamps: list[int] | None = None


@dataclass
class Recommendation:
    """The top-k unseen items for one history, best first, in source ids, with the scorer's logits.

    ``unknown_items``: the history's items outside the model's catalog (left out of the history).
    A history with no known item gets no recommendations (its scores would mean nothing).
    """

    user_id: Any
    items: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    unknown_items: list = field(default_factory=list)


def as_history(value: History | Mapping | Sequence, position: int) -> History:
    """A :class:`History` from a mapping (``items`` and optional ``user_id``, ``ratings``, ``timestamps``),
    a plain sequence of item ids, or a ``History``; ``position`` names it in errors and is the default user id."""
    if isinstance(value, History):
        return value
    if isinstance(value, Mapping):
        if "items" not in value:
            raise RecpostError(f"history {position}: no 'items'; give the user's item ids, oldest first")
        user_id = value.get("user_id", position)
        history = History(user_id, value["items"], value.get("ratings"), value.get("timestamps"))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        history = History(position, list(value))
    else:
        raise RecpostError(f"history {position}: expected a list of item ids or a mapping with 'items', got {type(value).__name__}")
    return _checked(history)


def _checked(history: History) -> History:
    who = f"user {history.user_id}"
    if not isinstance(history.items, Sequence) or isinstance(history.items, (str, bytes)):
        raise RecpostError(f"{who}: 'items' must be a list of item ids")
    for item in history.items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise RecpostError(f"{who}: item {item!r} is not an id; item ids are strings or integers")
    for name in ("ratings", "timestamps"):
        values = getattr(history, name)
        if values is None:
            continue
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) or len(values) != len(history.items):
            raise RecpostError(f"{who}: '{name}' must be a list as long as 'items' ({len(history.items)})")
        kinds = (int, float) if name == "ratings" else (int, float, str, datetime.date)
        if any(isinstance(v, bool) or not isinstance(v, kinds) for v in values):
            raise RecpostError(f"{who}: '{name}' must hold numbers" + (" or ISO dates" if name == "timestamps" else ""))
    return history


def in_seconds(histories: list[History], unit: str = "auto", declare: str = "timestamp_unit",
               where: str = "the histories' timestamps") -> list[History]:
    """The histories with their timestamps as integer unix seconds, by the data loader's rule
    (``recpost.core.timestamps``): numbers in ``unit`` (``auto``: detected over all the histories together, as
    over a data file's column), or ISO dates and date-times. The model was trained on seconds."""
    given = [h for h in histories if h.timestamps is not None]
    if not given:
        return histories
    try:
        values = pa.array([t for h in given for t in h.timestamps])
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise RecpostError(f"{where} mix numbers and text; give all of them as unix seconds (or ms, us, ns) or all "
                           "as ISO dates") from None
    seconds = iter(unix_seconds(values, where, unit, declare).to_pylist())
    return [History(h.user_id, h.items, h.ratings, None if h.timestamps is None else [next(seconds) for _ in h.timestamps])
            for h in histories]


class PretrainedRecommender:
    """A loaded model folder: ``recommend(histories, k)`` for new users, ``scores(...)`` for raw logits."""

    def __init__(self, folder: ModelFolder, config: dict, item_ids: list[str], program, device: torch.device) -> None:
        self.folder = folder
        self.config = config
        self.n_items: int = config["n_items"]
        self.max_len: int = config["max_len"]
        self.inputs: tuple[str, ...] = tuple(config["scorer"]["inputs"])
        self.item_ids = item_ids  # row i: the source id of internal item i + 1
        self.index = {item: i + 1 for i, item in enumerate(item_ids)}
        self.device = device
        self._scorer = program.module()

    def scores(self, items: torch.Tensor, ratings: torch.Tensor | None = None,
               timestamps: torch.Tensor | None = None) -> torch.Tensor:
        """The scorer's fp32 logits ``[B, n_items + 1]`` after left-padded internal ``items [B, L]`` (column 0,
        padding, is -inf; nothing else masked). ``ratings`` / ``timestamps`` ``[B, L]`` when the model reads them."""
        given = {"items": items, "ratings": ratings, "timestamps": timestamps}
        missing = [name for name in self.inputs if given[name] is None]
        if missing:
            raise RecpostError(f"this model reads the histories' {' and '.join(missing)}; give them for every history")
        with torch.no_grad():
            return self._scorer(*(given[name].to(self.device) for name in self.inputs))

    def recommend(self, histories: Sequence, k: int = 10, batch_size: int = DEFAULT_BATCH_SIZE,
                  timestamp_unit: str = "auto") -> list[Recommendation]:
        """The top-``k`` items each history has not had, best first, in source ids.

        ``histories``: per user, a list of item ids (oldest first) or a mapping with ``items`` and optional
        ``user_id``, ``ratings`` and ``timestamps`` (the items are put in time order when given). Timestamps
        follow the data loader's rule (:func:`in_seconds`): unix seconds, or ms / us / ns (declared with
        ``timestamp_unit`` or detected), or ISO dates and date-times.
        """
        if k < 1:
            raise RecpostError(f"k must be >= 1 (got {k})")
        histories = in_seconds([as_history(h, i) for i, h in enumerate(histories)], timestamp_unit)
        # Batches of similar lengths: a batch is padded to its longest history, so mixing lengths wastes work.
        order = sorted(range(len(histories)), key=lambda i: len(histories[i].items))
        out: list[Recommendation | None] = [None] * len(histories)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            for i, rec in zip(rows, self._recommend_batch([histories[i] for i in rows], k)):
                out[i] = rec
        return out

    def _recommend_batch(self, histories: list[History], k: int) -> list[Recommendation]:
        recs = [Recommendation(h.user_id) for h in histories]
        known = []  # (row in the batch, internal ids, their ratings/timestamps) of histories with a known item
        for row, history in enumerate(histories):
            internal, kept, recs[row].unknown_items = self._to_internal(history)
            for name in (n for n in self.inputs if n != "items"):
                if kept[name] is None:
                    raise RecpostError(f"user {history.user_id}: this model reads the histories' {name}; "
                                       f"give '{name}' for every history")
            if internal:
                known.append((row, internal, kept))
        if not known:
            return recs
        longest = max(len(internal) for _, internal, _ in known)
        width = min(self.max_len, longest)  # the model sees the last max_len items, as in evaluation
        history = torch.zeros(len(known), longest, dtype=torch.long)  # [B, H]: every item, masked from the ranking
        inputs = {name: torch.zeros(len(known), width, dtype=torch.float32 if name == "ratings" else torch.long)
                  for name in self.inputs}  # [B, L] each, left-padded
        for b, (_, internal, kept) in enumerate(known):
            history[b, longest - len(internal):] = torch.tensor(internal)
            n = min(width, len(internal))
            for name in self.inputs:
                values = internal if name == "items" else kept[name]
                inputs[name][b, width - n:] = torch.tensor(values[-n:], dtype=inputs[name].dtype)
        scores = mask_items(self.scores(**inputs).cpu(), history)  # [B, n_items + 1]
        top = torch.topk(scores, min(k, self.n_items), dim=1)
        for b, (row, _, _) in enumerate(known):
            found = torch.isfinite(top.values[b])  # fewer than k unseen items: the masked ones are left out
            recs[row].items = [self.item_ids[i - 1] for i in top.indices[b][found].tolist()]
            recs[row].scores = top.values[b][found].tolist()
        return recs

    def _to_internal(self, history: History) -> tuple[list[int], dict, list]:
        """The history's known items as internal ids in time order, their ratings/timestamps (or ``None``),
        and its unknown item ids (each once)."""
        order = range(len(history.items))
        if history.timestamps is not None:
            order = sorted(order, key=lambda j: history.timestamps[j])  # stable: ties keep the given order
        internal, kept_at, unknown, seen = [], [], [], set()
        for j in order:
            item = history.items[j]
            idx = self.index.get(str(item))
            if idx is not None:
                internal.append(idx)
                kept_at.append(j)
            elif str(item) not in seen:
                seen.add(str(item))
                unknown.append(item)
        kept = {name: None if getattr(history, name) is None else [getattr(history, name)[j] for j in kept_at]
                for name in ("ratings", "timestamps")}
        return internal, kept, unknown

    def backbone(self):
        """The backbone rebuilt from ``model.safetensors`` and the config (to fine-tune or inspect it in
        recpost), in eval mode."""
        from safetensors.torch import load_file

        from recpost.models import BackboneConfig, build_backbone

        backbone = build_backbone(BackboneConfig(**self.config["backbone"]), n_items=self.n_items, max_len=self.max_len)
        backbone.load_state_dict(load_file(self.folder.weights), strict=True)
        return backbone.eval()


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> PretrainedRecommender:
    """Load a folder written by ``recpost export``; one-line ``RecpostError`` when it is not one."""
    folder = ModelFolder(Path(path).expanduser())
    missing = [p.name for p in folder.files if not p.is_file()]
    if missing:
        raise RecpostError(f"{folder.path} is not an exported recpost model (missing {', '.join(missing)}); "
                           "write one with `recpost export --ckpt_path <best.ckpt> --out <folder>`")
    try:
        config = json.loads(folder.config.read_text())
        item_map = json.loads(folder.item_map.read_text())
    except json.JSONDecodeError as exc:
        raise RecpostError(f"{folder.path}: unreadable JSON ({exc}); export the model again") from None
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise RecpostError(f"{folder.config}: not a recpost model config of format version {FORMAT_VERSION}; "
                           "export the model again with this recpost")
    try:
        item_ids = [item_map[str(i)] for i in range(1, config["n_items"] + 1)]
    except KeyError as exc:
        raise RecpostError(f"{folder.item_map} has no source id for item {exc}; export the model again") from None
    device = torch.device(device)
    program = torch.export.load(folder.scorer)
    if device.type != "cpu":
        program = torch.export.passes.move_to_device_pass(program, device)
    return PretrainedRecommender(folder, config, item_ids, program, device)
