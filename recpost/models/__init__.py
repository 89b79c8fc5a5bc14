"""Models: sequence backbones (SASRec) behind one small interface (encode, score)."""

import torch

from recpost.models.backbone import Backbone, BackboneConfig, build_backbone, mask_padding_column
from recpost.models.sasrec import SASRec

# Checkpoints store the backbone config in their hyperparameters; allow it under weights_only=True.
torch.serialization.add_safe_globals([BackboneConfig])

__all__ = ["Backbone", "BackboneConfig", "SASRec", "build_backbone", "mask_padding_column"]
