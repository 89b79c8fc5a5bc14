"""Backbones by name: ``BackboneConfig.name`` -> class. A new backbone is one file plus one line here."""

from __future__ import annotations

from recpost.core.errors import RecpostError
from recpost.models.backbone import Backbone, BackboneConfig
from recpost.models.hstu import HSTU
from recpost.models.sasrec import SASRec

BACKBONES: dict[str, type[Backbone]] = {"sasrec": SASRec, "hstu": HSTU}


def build_backbone(cfg: BackboneConfig, n_items: int, max_len: int) -> Backbone:
    """The backbone ``cfg`` describes, for a catalog of ``n_items`` and histories of ``max_len``."""
    if cfg.name not in BACKBONES:
        raise RecpostError(f"model.backbone.name: unknown backbone {cfg.name!r}; use one of {sorted(BACKBONES)}")
    backbone = BACKBONES[cfg.name].from_config(cfg, n_items=n_items, max_len=max_len)
    backbone.compile_encode = bool(cfg.compile)
    return backbone
