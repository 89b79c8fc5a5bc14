"""Reward models against the truth: how reliable is one, and how alike do two err?

**Reliability** (simulator data: ``r*`` and ``pi_beta`` are known). The reward model's predictions
for every catalog item the test users have not consumed, at their test state, against ``r*`` after
the same history: RMSE, mean signed error (``bias``) and Spearman rank correlation, overall, by the
item's exposure decile under ``pi_beta`` (its expected count over the training log's states; decile 1
= the least shown tenth of the catalog, with the training ratings per item of each decile), inside vs
outside the logged support (items with at least ``--support_min_ratings`` training ratings), and on
the RM's own top 10 per user (where a policy that maximises it goes: a positive bias there is the
winner's curse). See ``recpost.evaluation.rm_reliability``.

**Independence** (with ``--evaluator``). An evaluator RM can only catch a policy that exploits the
training RM's errors if it does not make the same errors. This compares two RewardModel checkpoints
on the test users of a run's data:

- ``test_targets``: correlation of their signed errors against the observed rating of each user's
  test target (on real data the only truth there is; dominated by the rating noise both share);
- with a simulator (the true reward ``r*`` is known): correlation of their errors against ``r*`` over
  every unconsumed catalog item of every test user (``catalog``), and over the first model's top-10
  per user (``top10``: where a policy that exploits the first model goes), with each model's RMSE
  against ``r*`` there.

    python -m recpost.diagnostics.reward_check --config configs/pretrain/sim.yaml --reward_model <training RM best.ckpt> \\
        [--evaluator <evaluator RM best.ckpt>] [--support_min_ratings 1]

prints one ``name: value`` line per figure (``reliability/<group>/<metric>``, then the comparison).
"""

from __future__ import annotations

import numpy as np
import torch

from recpost.models.checkpoint import load_reward_model
from recpost.data import RecDataModule
from recpost.data.datamodule import HELD_OUT
from recpost.core.errors import RecpostError
from recpost.evaluation.rm_reliability import exposure_deciles, reliability_report


def _corr(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat(a).double().numpy(), torch.cat(b).double().numpy()
    return float(np.corrcoef(x, y)[0, 1])


def _rmse(errors: list[torch.Tensor]) -> float:
    return float(torch.cat(errors).double().pow(2).mean().sqrt())


@torch.no_grad()
def compare(dm: RecDataModule, reward_model: str, evaluator: str) -> dict[str, float]:
    """The figures of the module docstring for two RewardModel checkpoints on ``dm``'s test users."""
    models = [load_reward_model(path, dm.item_map_hash, what) for path, what in
              ((reward_model, "--reward_model"), (evaluator, "--evaluator"))]
    truth = dm.ground_truth
    target_err: tuple[list, list] = ([], [])
    catalog_err: tuple[list, list] = ([], [])
    top_err: tuple[list, list] = ([], [])
    for batch in dm.test_dataloader():
        preds = [m.predict_rewards(batch["input_items"], batch["input_ratings"], None,
                                   batch["input_timestamps"]).float() for m in models]  # [B, V + 1]
        rows = torch.arange(len(batch["target_item"]))
        for errs, pred in zip(target_err, preds):
            errs.append(pred[rows, batch["target_item"]] - batch["target_rating"].float())
        if truth is None:
            continue
        r_star = truth.catalog_reward(batch["user_index"], batch["history_items"])  # [B, V], after the history
        seen = torch.zeros_like(r_star, dtype=torch.bool)
        history = batch["history_items"]
        seen.scatter_(1, (history - 1).clamp(min=0), history > 0)  # item i is column i - 1
        top = preds[0][:, 1:].masked_fill(seen, float("-inf")).topk(10, dim=1).indices  # [B, 10]
        for cat, tops, pred in zip(catalog_err, top_err, preds):
            err = pred[:, 1:] - r_star  # [B, V]
            cat.append(err[~seen])
            tops.append(err.gather(1, top).flatten())
    out = {"users": float(dm.data.n_users), "test_targets/error_corr": _corr(*target_err),
           "test_targets/rmse_reward_model": _rmse(target_err[0]), "test_targets/rmse_evaluator": _rmse(target_err[1])}
    if truth is not None:
        for name, errs in (("catalog", catalog_err), ("top10", top_err)):
            out[f"{name}/error_corr"] = _corr(*errs)
            out[f"{name}/rmse_vs_true_reward_model"] = _rmse(errs[0])
            out[f"{name}/rmse_vs_true_evaluator"] = _rmse(errs[1])
    return out


@torch.no_grad()
def expected_train_exposure(dm: RecDataModule, max_states: int = 50_000, seed: int = 0) -> torch.Tensor:
    """How often ``pi_beta`` is expected to choose each catalog item over the training log's states ``[V]``.

    The sum of ``pi_beta(i | history)`` over every state at which a training item was chosen (each
    user's prefixes before their validation target): the expected training count of item ``i``, of
    which the log's count is one noisy draw. Not ``pi_beta`` at the evaluated states, where the items
    most users already had are excluded (probability 0) however often they are shown. Above
    ``max_states`` states, a uniform sample of them, scaled back.
    """
    d, truth = dm.data, dm.ground_truth
    lengths = np.diff(d.offsets)
    n_states = np.maximum(lengths - HELD_OUT["val"], 0)  # [U] training items per user
    user = np.repeat(np.arange(d.n_users), n_states)  # [S] one row per state
    step = np.arange(len(user)) - np.repeat(np.cumsum(n_states) - n_states, n_states)  # [S] position in the sequence
    scale = 1.0
    if len(user) > max_states:
        keep = np.sort(np.random.default_rng(seed).choice(len(user), max_states, replace=False))
        scale, user, step = len(user) / max_states, user[keep], step[keep]
    exposure = torch.zeros(d.n_items, dtype=torch.float64)
    chunk = max(1, min(2048, (1 << 22) // d.n_items))  # states per block: [chunk, V] stays near 4M floats
    for s in range(0, len(user), chunk):
        u, t = user[s:s + chunk], step[s:s + chunk]
        width = max(1, int(t.max()))
        idx = d.offsets[u][:, None] + t[:, None] - width + np.arange(width)[None, :]  # [B, W], right-aligned prefix
        history = np.where(idx >= d.offsets[u][:, None], d.item[np.clip(idx, 0, len(d.item) - 1)], 0)
        log_p = truth.catalog_behavior_logits(torch.from_numpy(u), torch.from_numpy(history))  # [B, V]
        exposure += log_p.exp().double().sum(0)
    return exposure * scale


@torch.no_grad()
def reliability(dm: RecDataModule, reward_model: str, support_min_ratings: int = 1, n_bins: int = 10,
                max_pairs: int = 20_000_000) -> dict[str, float]:
    """The reliability report of the module docstring for one RewardModel checkpoint on ``dm``'s test users
    (the first test batches holding ``max_pairs`` (user, item) pairs, for catalogs too large for all users;
    ``users`` says how many)."""
    truth = dm.ground_truth
    if truth is None:
        raise RecpostError("reward reliability needs simulator data (the true reward r*); use a config whose data "
                           "source is recpost.data.Simulator")
    model = load_reward_model(reward_model, dm.item_map_hash, "--reward_model")
    preds, r_stars, items, top10 = [], [], [], []
    n_users = 0
    for batch in dm.test_dataloader():
        if n_users and n_users * dm.n_items >= max_pairs:
            break
        n_users += len(batch["user_index"])
        pred = model.predict_rewards(batch["input_items"], batch["input_ratings"], None,
                                     batch["input_timestamps"]).float()[:, 1:]  # [B, V]: column j - 1 = item j
        r_star = truth.catalog_reward(batch["user_index"], batch["history_items"])  # [B, V]
        seen = torch.zeros_like(pred, dtype=torch.bool)
        history = batch["history_items"]
        seen.scatter_(1, (history - 1).clamp(min=0), history > 0)
        best = pred.masked_fill(seen, float("-inf")).topk(min(10, pred.shape[1]), dim=1).indices  # [B, 10]
        top = torch.zeros_like(seen).scatter_(1, best, True) & ~seen
        keep = ~seen  # [B, V]: items the user has not consumed
        preds.append(pred[keep])
        r_stars.append(r_star[keep])
        items.append(torch.arange(dm.n_items).expand_as(pred)[keep])
        top10.append(top[keep])
    item = torch.cat(items)
    counts = torch.from_numpy(dm.train_item_counts()[1:]).long()  # [V] training ratings per item
    exposure = expected_train_exposure(dm)  # [V]
    report = reliability_report(
        torch.cat(preds), torch.cat(r_stars), item, exposure, counts[item] >= support_min_ratings,
        n_bins=n_bins, extra_groups={"rm_top10": torch.cat(top10)},
    )
    bins = exposure_deciles(exposure, n_bins)
    for k in range(1, n_bins + 1):
        report[f"exposure_decile_{k}/train_ratings_per_item"] = float(counts[bins == k].double().mean())
        report[f"exposure_decile_{k}/expected_exposure_per_item"] = float(exposure[bins == k].mean())
    report["users"] = float(n_users)
    report["in_support/items"] = float((counts >= support_min_ratings).sum())
    report["out_of_support/items"] = float((counts < support_min_ratings).sum())
    return {f"reliability/{name}": value for name, value in report.items()}


def main(config: list[str], reward_model: str, evaluator: str | None = None, support_min_ratings: int = 1,
         ) -> dict[str, float]:
    """Check a reward model against the truth, and against an evaluator reward model.

    Args:
        config: the fit config(s) of the run (their data: sections, composed in order).
        reward_model: the training reward model's best.ckpt.
        evaluator: the evaluator reward model's best.ckpt (optional: the independence check).
        support_min_ratings: training ratings an item needs to count as inside the logged support.
    """
    dm = RecDataModule.from_configs(config)
    if dm.ground_truth is None and evaluator is None:
        raise RecpostError("nothing to check: the reliability report needs simulator data (r*) and the comparison "
                           "needs --evaluator; give one of them")
    figures = {}
    if dm.ground_truth is not None:
        figures.update(reliability(dm, reward_model, support_min_ratings))
    if evaluator is not None:
        figures.update(compare(dm, reward_model, evaluator))
    for name, value in figures.items():
        print(f"{name}: {value:.4f}")
    return figures


if __name__ == "__main__":
    import argparse  # four flags, one of them repeated: the standard library's parser is enough
    import sys

    parser = argparse.ArgumentParser(prog="python -m recpost.diagnostics.reward_check", description=main.__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="a fit config of the run (repeat to compose)")
    parser.add_argument("--reward_model", required=True, help="the training reward model's best.ckpt")
    parser.add_argument("--evaluator", help="the evaluator reward model's best.ckpt (compare the two)")
    parser.add_argument("--support_min_ratings", type=int, default=1,
                        help="training ratings an item needs to be inside the logged support (default 1)")
    try:
        main(**vars(parser.parse_args()))
    except RecpostError as exc:  # a user-fixable problem: one line, as the recpost CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
