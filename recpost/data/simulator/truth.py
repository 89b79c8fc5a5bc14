"""Ground-truth metrics of a policy's catalog scores in a simulated world (``true_reward@10``, ...)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recpost.data.interactions import Interactions
from recpost.data.simulator.rng import take
from recpost.data.simulator.world import BLOCK_ELEMENTS, RATING_MIN, SimWorld

TOP_K = 10


class SimulatorTruth:
    """Ground-truth metrics of any policy's catalog scores, per evaluated user.

    Everything is restricted to the model's catalog (items somebody consumed; items never consumed
    have no internal id), and to items the user has not consumed yet (``history_items``).

    - ``true_reward@10``: mean ``r*`` of the policy's top-10.
    - ``true_ndcg@10``: DCG of the policy's top-10 with gains ``r* - 1`` (a 1-star item adds nothing),
      over the DCG of the ideal top-10 of unconsumed catalog items.
    - ``regret@10``: ``true_reward@10_oracle - true_reward@10``.
    - ``true_reward_sampled``: expected ``r*`` of one item drawn from ``softmax(scores)``.
    - ``true_reward@10_behavior``: mean ``r*`` of ``pi_beta``'s 10 most probable items after the same
      history (its visit slate included).
    - ``true_reward@10_oracle``: mean ``r*`` of the 10 best unconsumed catalog items.
    """

    metric_names = (
        "true_reward@10", "true_ndcg@10", "regret@10", "true_reward_sampled",
        "true_reward@10_behavior", "true_reward@10_oracle",
    )

    def __init__(self, world: SimWorld, data: Interactions) -> None:
        self.world = world
        items = data.item_ids.data.table.column("item_id")
        users = data.user_ids.data.table.column("user_id")
        # internal item j (1..n_items) -> world item; slot 0 (padding) -> -1
        self.world_item = torch.from_numpy(
            np.concatenate([[-1], pc.cast(items, pa.int64()).to_numpy()]).astype(np.int64)
        )  # [n_items + 1]
        self.world_user = torch.from_numpy(pc.cast(users, pa.int64()).to_numpy().astype(np.int64))  # [n_users]
        self.n_items = data.n_items
        k = torch.arange(TOP_K, dtype=torch.float32)
        self._discount = 1.0 / torch.log2(k + 2.0)  # [10]

    def evaluate(self, batch: dict[str, torch.Tensor], scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-user ground-truth metrics ``name -> [B]`` for ``scores [B, n_items + 1]`` (fp32)."""
        device = scores.device
        B = scores.shape[0]
        rows = max(1, BLOCK_ELEMENTS // max(1, self.world.n_items))
        parts = [self._evaluate(
            batch["user_index"][s:s + rows].cpu(), batch["history_items"][s:s + rows].cpu(), scores[s:s + rows].float().cpu()
        ) for s in range(0, B, rows)]
        return {name: torch.cat([p[name] for p in parts]).to(device) for name in self.metric_names}

    def catalog_reward(self, user_index: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """``r*`` of every catalog item ``[B, n_items]`` (column ``j - 1`` = internal item ``j``) for the
        users ``user_index [B]`` (DataModule rows) after their ``history [B, H]`` (internal ids, 0 = pad)."""
        users = take(self.world_user, user_index.cpu())  # [B] world users
        return self.world.true_reward(users, self.world_item[1:], take(self.world_item, history.cpu()))

    def catalog_behavior_logits(self, user_index: torch.Tensor, history: torch.Tensor, slate: bool = True) -> torch.Tensor:
        """Logits of ``pi_beta`` over the catalog ``[B, n_items]`` (column ``j - 1`` = internal item ``j``),
        normalised over the whole world (``log_softmax`` of the world's items, catalog columns kept), so
        their exponentials are the true propensities; ``slate=False``: the visit without its slate."""
        users = take(self.world_user, user_index.cpu())
        logits = self.world.behavior_logits(users, take(self.world_item, history.cpu()), slate=slate)  # [B, I]
        return torch.log_softmax(logits, dim=-1)[:, self.world_item[1:]]

    def _evaluate(self, user_index: torch.Tensor, history: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        B = scores.shape[0]
        k = min(TOP_K, self.n_items)
        users = take(self.world_user, user_index)  # [B] world users
        catalog = self.world_item[1:]  # [n] world items of internal 1..n
        r = torch.empty(B, self.n_items + 1)
        r[:, 0] = RATING_MIN
        r[:, 1:] = self.catalog_reward(user_index, history)  # [B, n + 1]
        unconsumed = torch.ones(B, self.n_items + 1, dtype=torch.bool)
        unconsumed[:, 0] = False
        unconsumed.scatter_(1, history, False)
        unconsumed[:, 0] = False  # padding entries of the history scattered onto column 0

        top = scores.topk(k, dim=1).indices  # [B, k]
        r_top = r.gather(1, top)  # [B, k]
        ideal = r.masked_fill(~unconsumed, float("-inf")).topk(k, dim=1).values  # [B, k]
        discount = self._discount[:k]
        dcg = ((r_top - RATING_MIN) * discount).sum(1)
        idcg = ((ideal - RATING_MIN) * discount).sum(1)

        probs = torch.softmax(scores, dim=1)  # -inf (masked) entries get 0
        world_history = take(self.world_item, history)  # [B, H], -1 where padding
        behaviour = self.world.behavior_logits(users, world_history)[:, catalog]  # [B, n]
        behaviour = torch.cat([torch.full((B, 1), float("-inf")), behaviour], dim=1)
        behaviour = behaviour.masked_fill(~unconsumed, float("-inf"))
        r_beh = r.gather(1, behaviour.topk(k, dim=1).indices)

        policy, oracle = r_top.mean(1), ideal.mean(1)
        return {
            "true_reward@10": policy,
            "true_ndcg@10": dcg / idcg.clamp(min=1e-12),
            "regret@10": oracle - policy,
            "true_reward_sampled": (probs * r).sum(1),
            "true_reward@10_behavior": r_beh.mean(1),
            "true_reward@10_oracle": oracle,
        }
