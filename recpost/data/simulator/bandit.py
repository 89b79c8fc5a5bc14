"""The one-step (contextual bandit) view of a simulated world, with the paper's analytic target."""

from __future__ import annotations

from typing import Any

import torch

from recpost.data.simulator.config import WorldConfig, check
from recpost.data.simulator.world import SimWorld


class BanditWorld:
    """The one-step (contextual bandit) view of the simulator, as in the paper's theory.

    Context ``c`` is world user ``c`` with a fixed short history drawn from ``pi_beta``; the actions are
    the world's ``A`` items. Everything is an explicit ``[C, A]`` tensor: ``pi_beta``, ``true_reward``
    and the analytic target ``pi*_lambda ∝ pi_beta * exp(r* / lambda)`` (Proposition 4.1), so a
    trained policy can be compared with the theory exactly. It does not go through the DataModule:
    build it directly, draw logs with :meth:`sample_logs`, fit a policy ``[C, A]`` on them, and score
    it with :meth:`kl_to_target` and :meth:`value`.

    Args:
        n_contexts: contexts ``C`` (users).
        n_actions: actions ``A`` (items).
        history_len: items in each context's fixed history (excluded from its actions).
        seed: world seed.
        behavior_temperature: softer than the sequential default (0.3), so that every action is
            logged often enough for a tabular policy to be checked against the target with a few
            thousand logs per context.
        slate_size: 0: a one-step world has no sequence of visits; a fixed slate per context would
            only be a constant boost on a few of the ``A`` actions.
        world: any other :class:`WorldConfig` setting (``noise_std``, ``taste_weight``, ...); the
            ones above replace ``n_users``, ``n_items``, ``seed``, and two of its defaults.
    """

    def __init__(
        self,
        n_contexts: int = 64,
        n_actions: int = 50,
        history_len: int = 3,
        seed: int = 0,
        behavior_temperature: float = 0.5,
        slate_size: int = 0,
        **world: Any,
    ) -> None:
        check(history_len >= 0, f"bandit history_len must be >= 0 (got {history_len})")
        check(
            history_len < n_actions,
            f"bandit history_len={history_len} leaves no action among n_actions={n_actions}; lower history_len",
        )
        self.world = SimWorld(WorldConfig(
            n_users=n_contexts, n_items=n_actions, seed=seed, behavior_temperature=behavior_temperature,
            slate_size=slate_size, **world,
        ))
        users = torch.arange(n_contexts)
        self.history = self.world.sample_sequences(users, torch.full((n_contexts,), history_len), block=0)  # [C, h]
        self.log_pi_beta = torch.log_softmax(self.world.behavior_logits(users, self.history), dim=-1)  # [C, A]
        self.pi_beta = self.log_pi_beta.exp()
        self.true_reward = self.world.true_reward(users, history=self.history)  # [C, A]

    @property
    def n_contexts(self) -> int:
        return self.pi_beta.shape[0]

    @property
    def n_actions(self) -> int:
        return self.pi_beta.shape[1]

    def sample_logs(self, n_per_context: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logged ``(context [N], action [N], observed_reward [N])``, ``N = C * n_per_context``, actions from ``pi_beta``."""
        context = torch.arange(self.n_contexts).repeat_interleave(n_per_context)
        action = torch.multinomial(self.pi_beta, n_per_context, replacement=True, generator=generator).flatten()
        reward = self.world.observe(self.true_reward[context, action], action, generator)
        return context, action, reward

    def target_log_probs(self, lam: float) -> torch.Tensor:
        """``log pi*_lambda`` ``[C, A]``, normalised in log space (stable for tiny lambda)."""
        check(lam > 0, f"lambda must be > 0 (got {lam}); small lambda concentrates on the best actions")
        return torch.log_softmax(self.log_pi_beta.double() + self.true_reward.double() / lam, dim=-1).float()

    def target(self, lam: float) -> torch.Tensor:
        """``pi*_lambda ∝ pi_beta * exp(r* / lambda)`` ``[C, A]``."""
        return self.target_log_probs(lam).exp()

    def kl_to_target(self, policy_log_probs: torch.Tensor, lam: float) -> float:
        """Mean over contexts of ``KL(pi*_lambda || pi_theta)`` for ``policy_log_probs [C, A]``."""
        log_p = self.target_log_probs(lam).double()
        p = log_p.exp()
        diff = torch.where(p > 0, log_p - policy_log_probs.double(), torch.zeros_like(log_p))
        return float((p * diff).sum(-1).mean())

    def value(self, policy_probs: torch.Tensor) -> float:
        """Expected true reward of a policy ``[C, A]``, averaged over contexts."""
        return float((policy_probs.double() * self.true_reward.double()).sum(-1).mean())
