"""The batches every method receives, written down once: their keys, shapes and meaning.

``recpost.data.RecDataModule`` builds them (``train_batch``, ``eval_batch``); methods, metrics and the
simulator's ground truth read them. Histories are left-padded with item 0 (padding), so the newest
item is always last. Names say what a value is: ``next_*`` is per position of a training window
(the item logged after that position), ``target_*`` is per user in evaluation (the held-out item).
Nothing of a target (id, rating or timestamp) is ever an input.
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor


class TrainBatch(TypedDict):
    """``B`` training windows of up to ``L`` inputs; a next-item target at every position that has one.

    A window is a slice of a user's training sequence (``data.max_len`` inputs plus the item after the
    last one). Every training target is in exactly one window per epoch.
    """

    input_items: Tensor  # [B, L] long: the window's items, 0 = padding
    input_ratings: Tensor  # [B, L] float: their ratings (0 at padding)
    input_timestamps: Tensor  # [B, L] long: their timestamps (0 at padding)
    next_items: Tensor  # [B, L] long: the item logged right after each position; 0 = no target there
    next_ratings: Tensor  # [B, L] float: its rating (0 where no target)
    next_rewards: Tensor  # [B, L] float: its reward under data.reward_transform (0 where no target)
    next_liked: Tensor  # [B, L] bool: its rating >= data.liked_threshold (False where no target)
    earlier_items: Tensor  # [B, H] long: the user's items before the window's first input, 0 = padding;
    # with the window's inputs up to a position, the whole history a state has had (what a policy must
    # not recommend again)


class EvalBatch(TypedDict, total=False):
    """``B`` users for validation, test or prediction: their history and (not in prediction) the target."""

    user_index: Tensor  # [B] long: the user's row (0..n_users - 1), to drop DDP's repeated users
    input_items: Tensor  # [B, L] long: the last data.max_len items before the target, 0 = padding
    input_ratings: Tensor  # [B, L] float: their ratings
    input_timestamps: Tensor  # [B, L] long: their timestamps (never the target's)
    history_items: Tensor  # [B, H] long: every item before the target (may exceed max_len): masked in ranking
    target_item: Tensor  # [B] long: the held-out item (validation: second to last; test: last)
    target_rating: Tensor  # [B] float: its rating
    target_liked: Tensor  # [B] bool: its rating >= data.liked_threshold
