"""A matrix-factorisation rating model: a judge that shares no architecture, no encoder and no
initialisation with the sequence reward models (``RatingModel``).

Biased matrix factorisation (Koren, Bell, Volinsky 2009), with the user's part computed rather than
looked up::

    r(u, i) = b + b_i + b_u + p_u . q_i

``b``, ``b_i`` and the item factors ``q_i`` are learned. The user's ``(b_u, p_u)`` is the ridge
regression of the user's own given ratings on the item factors (the ALS user step; Hu, Koren, Volinsky
2008; Zhou et al. 2008, whose weighted-lambda penalty ``reg * n_u`` this uses)::

    (b_u, p_u) = argmin  sum_{j in H_u} (r_uj - b - b_j - b_u - p_u . q_j)^2 + reg * n_u * (b_u^2 + |p_u|^2)

Why computed: the "state" of an MF judge is the user, and a user must be scored from their own
training interactions only. Folding the user in from the history a batch gives (which never holds the
target: ``recpost.core.batch``) scores every user, drawn into the judge's bootstrap resample or not, from
exactly the ratings before the item being predicted, with no user table that could hold a held-out
rating. At the joint optimum of the MF objective each user's factors are this ridge solution, so it is
also what a user-table MF would have learned for a training user.

Training minimises the MF objective per training window (a window is a user, or a slice of a long user's
sequence, as ``data.max_len`` cuts it): the user's factors are solved on the window's ratings, held fixed
(by the envelope theorem the gradient of the objective minimised over the user is its gradient at the
minimiser), and the squared errors plus ``reg`` times the squared norms of the items' ``b_i, q_i`` are
minimised (``MFRatingModel.loss``). Predictions are in fp32, on the source's rating scale (stars).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from recpost.models.backbone import mask_padding_column

INIT_STD = 0.1  # item factors start N(0, 0.1^2): small, and different per seed


class MFRatingModel(nn.Module):
    """``r(u, i) = b + b_i + b_u + p_u . q_i`` with the user's ``(b_u, p_u)`` fitted to the given history.

    Args:
        n_items: catalog size (item 0 is padding).
        rank: size of the factors ``p_u``, ``q_i``.
        reg: ridge weight: ``reg * n_u`` on the user's ``(b_u, p_u)``, ``reg`` per rating on the item's
            ``(b_i, q_i)``.
    """

    def __init__(self, n_items: int, rank: int, reg: float) -> None:
        super().__init__()
        self.rank = rank
        self.reg = reg
        self.bias = nn.Parameter(torch.zeros(()))
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1))
        self.item_factors = nn.Parameter(torch.randn(n_items + 1, rank) * INIT_STD)
        # b set once from the training ratings at the start of the first fit (then saved in checkpoints).
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def n_items(self) -> int:
        return self.item_bias.shape[0] - 1

    @torch.no_grad()
    def init_bias(self, global_mean: float) -> None:
        """``b`` = the mean training rating (the rest starts at 0 and small random factors)."""
        self.bias.fill_(global_mean)
        self.initialized.fill_(True)

    def user_factors(self, items: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
        """``(b_u, p_u)`` ``[B, rank + 1]`` of each row of ``items [B, L]`` (0 = padding) rated ``ratings [B, L]``:
        the ridge solution of the module docstring (0 for a row without ratings)."""
        with torch.autocast(device_type=items.device.type, enabled=False):
            valid = (items > 0).float()  # [B, L]
            ones = torch.ones(*items.shape, 1, device=items.device)
            z = torch.cat([ones, self.item_factors[items]], dim=-1) * valid.unsqueeze(-1)  # [B, L, rank + 1]
            y = (ratings.float() - self.bias - self.item_bias[items]) * valid  # [B, L]
            penalty = self.reg * valid.sum(1).clamp(min=1.0)  # [B]: reg * n_u
            eye = torch.eye(self.rank + 1, device=items.device)
            gram = z.transpose(1, 2) @ z + penalty[:, None, None] * eye  # [B, rank + 1, rank + 1]
            return torch.linalg.solve(gram, (z.transpose(1, 2) @ y.unsqueeze(-1))).squeeze(-1)  # [B, rank + 1]

    def _predict(self, user: torch.Tensor, columns: slice | torch.Tensor) -> torch.Tensor:
        """Ratings of catalog ``columns`` (a slice, or item ids ``[K]`` / ``[B, K]``) for users ``[B, rank + 1]``."""
        b_u, p_u = user[:, 0], user[:, 1:]
        if isinstance(columns, torch.Tensor) and columns.dim() == 2:  # per-row candidates [B, K]
            return (self.bias + b_u[:, None] + self.item_bias[columns]
                    + (self.item_factors[columns] * p_u[:, None, :]).sum(-1))
        return self.bias + b_u[:, None] + self.item_bias[columns] + p_u @ self.item_factors[columns].T

    def predict_rewards(
        self, input_items: torch.Tensor, input_ratings: torch.Tensor, candidates: torch.Tensor | None = None,
        input_timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted ratings after each history ``input_items [B, L]`` (``RatingModel.predict_rewards``'s
        interface; timestamps unused): of ``candidates [B, K]`` -> ``[B, K]``, else of every item
        ``[B, n_items + 1]`` (column 0 is padding: meaningless)."""
        user = self.user_factors(input_items, input_ratings)
        with torch.autocast(device_type=user.device.type, enabled=False):
            return self._predict(user, slice(None) if candidates is None else candidates)

    def column_scorer(
        self, input_items: torch.Tensor, input_ratings: torch.Tensor, input_timestamps: torch.Tensor | None = None,
    ) -> Callable[[slice | torch.Tensor], torch.Tensor]:
        """Fit each user once; returns ``columns -> [B, K]`` predicted ratings of those catalog columns (a
        slice, or item ids ``[K]``), the padding column -inf (what ranking a chunk of the catalog needs)."""
        user = self.user_factors(input_items, input_ratings)

        def score(columns: slice | torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=user.device.type, enabled=False):
                return mask_padding_column(self._predict(user, columns), columns)

        return score

    def loss(self, items: torch.Tensor, ratings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MF objective of rows of rated ``items [B, L]`` (0 = padding), each row one user:
        ``(objective, mse)``, both means over the ratings. The user's factors are fitted to the row and held
        fixed; ``objective`` = mean squared error + ``reg`` x mean over the ratings of
        ``|q_i|^2 + b_i^2 + |p_u|^2 + b_u^2`` (so the user's part is what the fit minimised)."""
        user = self.user_factors(items, ratings).detach()  # [B, rank + 1]
        valid = items > 0  # [B, L]
        pred = self._predict(user, items)  # [B, L]
        err = (pred - ratings.float())[valid]  # [N]
        per_rating = (self.item_factors[items].pow(2).sum(-1) + self.item_bias[items].pow(2)
                      + user.pow(2).sum(-1, keepdim=True))[valid]  # [N]
        mse = err.pow(2).mean()
        return mse + self.reg * per_rating.mean(), mse
