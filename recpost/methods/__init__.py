"""Post-training methods: one LightningModule per method on a shared base.

- ``RecModule`` (``base.py``): backbone, optimiser, ``init_from``, frozen helpers, the whole evaluation;
- ``NextItemModule`` (``next_item.py``): per-target cross-entropy (full or sampled softmax) for
  ``SFT``, and ``RewardWeightedModule`` (``weighted.py``: weight normalisation, global batch under DDP)
  for ``ExpSFT``, ``LinearSFT``, ``ASFT`` and ``FilteredBC``;
- ``PolicyModule`` (``policy_base.py``): reference policy, reward model, states, masked log-probs for
  ``PPO``, ``DPO`` and ``KTO``;
- ``RewardModel`` trains the reward-model component (``recpost.models.RatingModel``), ``MFRewardModel`` a
  matrix-factorisation rating model (``recpost.models.MFRatingModel``), both on ``RatingModule``
  (``rating_base.py``: their shared evaluation).
"""

from recpost.methods.asft import ASFT
from recpost.methods.base import RecModule
from recpost.methods.dpo import DPO
from recpost.methods.exp_sft import ExpSFT
from recpost.methods.filtered_bc import FilteredBC
from recpost.methods.kto import KTO
from recpost.methods.linear_sft import LinearSFT
from recpost.methods.mf_reward_model import MFRewardModel
from recpost.methods.next_item import NextItemModule
from recpost.methods.policy_base import PolicyModule
from recpost.methods.ppo import PPO
from recpost.methods.reward_model import RewardModel
from recpost.methods.sft import SFT
from recpost.methods.weighted import RewardWeightedModule

__all__ = ["ASFT", "DPO", "KTO", "PPO", "ExpSFT", "FilteredBC", "LinearSFT", "MFRewardModel", "NextItemModule",
           "PolicyModule", "RecModule", "RewardModel", "RewardWeightedModule", "SFT"]
