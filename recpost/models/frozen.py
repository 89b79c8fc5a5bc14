"""Frozen helper modules: the reference policy and the reward models a method holds but never trains."""

from __future__ import annotations

import copy

from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode (no dropout); returns the module."""
    module.requires_grad_(False)
    return module.eval()


def frozen_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy (the reference policy: the initial policy, which training must not move)."""
    return freeze(copy.deepcopy(module))


def disable_dropout(module: nn.Module) -> None:
    """Set every dropout probability to 0 (TRL's ``disable_dropout``): log-probabilities of the same
    state then agree between rollout and update, and policy and reference differ only by training."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
