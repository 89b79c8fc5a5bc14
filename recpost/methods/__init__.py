"""Post-training methods: one LightningModule per method on the shared ``RecModule`` base."""

from recpost.methods.base import NextItemModule, RecModule
from recpost.methods.dpo import DPO
from recpost.methods.exp_sft import ExpSFT
from recpost.methods.ppo import PPO
from recpost.methods.reward_model import RewardModel
from recpost.methods.sft import SFT

__all__ = ["DPO", "PPO", "ExpSFT", "NextItemModule", "RecModule", "RewardModel", "SFT"]
