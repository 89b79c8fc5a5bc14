"""The seeds and user resamples of a study's reward models: each model of a seed (the study's RM, the
evaluator, the ensemble's other members, the judges) gets its own training seed and, but for the study's
RM, its own bootstrap resample of the users, so that they err on different users (used by
:mod:`recpost.experiment.plan`)."""

from __future__ import annotations

# Offsets of the other reward models' seeds from the study seed (another initialisation and batch order):
# the evaluator, the ensemble's members 1, 2, ... and the judges 0, 1, ..., SEED_STRIDE apart, so that
# every reward model of a study has its own seed for up to SEED_STRIDE study seeds.
EVALUATOR_SEED_OFFSET = 1000
ENSEMBLE_SEED_OFFSET = 10_000
JUDGE_SEED_OFFSET = 100_000
SEED_STRIDE = 1000


def role_seed(seed: int, role: str, index: int = 0) -> int:
    """The training seed of a reward model of study seed ``seed``: the study's RM (``reward_model``) has the
    seed itself, the ``evaluator`` seed + 1000, ensemble member ``index`` (1, 2, ...) seed + 10,000 +
    1000 (index - 1), judge ``index`` (0, 1, ...) seed + 100,000 + 1000 index."""
    if role == "reward_model":
        return seed
    if role == "evaluator":
        return seed + EVALUATOR_SEED_OFFSET
    if role == "ensemble":
        return seed + ENSEMBLE_SEED_OFFSET + SEED_STRIDE * (index - 1)
    if role == "judge":
        return seed + JUDGE_SEED_OFFSET + SEED_STRIDE * index
    raise ValueError(f"no reward-model role {role!r}")


def bootstrap_overrides(resample_seed: int) -> list[str]:
    """Train on a bootstrap resample of the training users, drawn with ``resample_seed``."""
    return ["--data.train_users=bootstrap", f"--data.train_users_seed={resample_seed}"]


def evaluator_overrides(seed: int) -> list[str]:
    """The evaluator RM's extra overrides: it trains on a bootstrap resample of the training users.

    Another seed alone (``--seed_everything seed + EVALUATOR_SEED_OFFSET``) gives another
    initialisation and batch order, but the same users: its errors would be correlated with the
    training RM's, and a policy that exploits the training RM would look good to the evaluator too. A
    resample of the users (seeded by the same offset seed) makes the two RMs err on different users.
    """
    return bootstrap_overrides(role_seed(seed, "evaluator"))


def ensemble_overrides(seed: int, member: int) -> list[str]:
    """Ensemble member ``member``'s (1, 2, ...) extra overrides: its own bootstrap resample of the training users,
    so RS-DPO's members disagree where the data is thin, not only by initialisation."""
    return bootstrap_overrides(role_seed(seed, "ensemble", member))


def judge_overrides(seed: int, k: int) -> list[str]:
    """Judge ``k``'s extra overrides: like the evaluator, its own bootstrap resample of the training users
    (seeded by its own seed), so the judges err on other users than each other and than the RMs a method
    trains against."""
    return bootstrap_overrides(role_seed(seed, "judge", k))
