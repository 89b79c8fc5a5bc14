"""Plain SFT: next-item cross-entropy at every position.

Used for pretraining from scratch (behaviour cloning of the logging policy) and, continued from the
pretrained checkpoint with the same optimiser and budget, as the baseline every post-training method
must beat.
"""

from __future__ import annotations

import torch

from recpost.core.batch import TrainBatch
from recpost.methods.next_item import NextItemModule


class SFT(NextItemModule):
    """Behaviour cloning: cross-entropy of the logged next item (full or sampled softmax), reduced over the
    batch's targets by ``target_norm``."""

    def training_loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = self.next_item_targets(batch)
        loss, _ = self.target_loss(targets, self.target_norm_coefficients(targets.rewards))
        return loss, {}
