"""Models: sequence backbones (SASRec, HSTU) behind one small interface (encode, score), and the reward
model as a component (a backbone with a rating head), and a matrix-factorisation rating model."""

import torch

from recpost.models.backbone import Backbone, BackboneConfig, mask_padding_column
from recpost.models.frozen import disable_dropout, freeze, frozen_copy
from recpost.models.hstu import HSTU
from recpost.models.mf import MFRatingModel
from recpost.models.registry import BACKBONES, build_backbone
from recpost.models.reward import RatingHead, RatingModel
from recpost.models.sasrec import SASRec

# Checkpoints store the backbone config in their hyperparameters; allow it under weights_only=True.
torch.serialization.add_safe_globals([BackboneConfig])

__all__ = [
    "BACKBONES", "HSTU", "Backbone", "BackboneConfig", "MFRatingModel", "RatingHead", "RatingModel", "SASRec", "build_backbone",
    "disable_dropout", "freeze", "frozen_copy", "mask_padding_column",
]
