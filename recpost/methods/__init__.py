"""Post-training methods: one LightningModule per method on the shared ``RecModule`` base."""

from recpost.methods.base import RecModule
from recpost.methods.exp_sft import ExpSFT
from recpost.methods.sft import SFT

__all__ = ["ExpSFT", "RecModule", "SFT"]
