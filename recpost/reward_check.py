"""How alike do two reward models err? A check of the evaluator ("judge") reward model's independence.

An evaluator RM can only catch a policy that exploits the training RM's errors if it does not make
the same errors. This compares two RewardModel checkpoints on the test users of a run's data:

- ``test_targets``: correlation of their signed errors against the observed rating of each user's
  test target (on real data the only truth there is; dominated by the rating noise both share);
- with a simulator (the true reward ``r*`` is known): correlation of their errors against ``r*`` over
  every unconsumed catalog item of every test user (``catalog``), and over the first model's top-10
  per user (``top10``: where a policy that exploits the first model goes), with each model's RMSE
  against ``r*`` there.

    python -m recpost.reward_check --config configs/pretrain/sim.yaml \\
        --reward_model <training RM best.ckpt> --evaluator <evaluator RM best.ckpt>

prints one ``name: value`` line per figure.
"""

from __future__ import annotations

import numpy as np
import torch

from recpost.checkpoint import load_reward_model
from recpost.data import RecDataModule


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
        r_star = truth.world.true_reward(truth.world_user[batch["user_index"]], truth.world_item[1:])  # [B, V]
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


def main(config: list[str], reward_model: str, evaluator: str) -> dict[str, float]:
    """Compare two reward models' errors on the test users of a run's data.

    Args:
        config: the fit config(s) of the run (their data: sections, composed in order).
        reward_model: the training reward model's best.ckpt.
        evaluator: the evaluator reward model's best.ckpt.
    """
    figures = compare(RecDataModule.from_configs(config), reward_model, evaluator)
    for name, value in figures.items():
        print(f"{name}: {value:.4f}")
    return figures


if __name__ == "__main__":
    import argparse  # three flags, one of them repeated: the standard library's parser is enough

    parser = argparse.ArgumentParser(prog="python -m recpost.reward_check", description=main.__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="a fit config of the run (repeat to compose)")
    parser.add_argument("--reward_model", required=True, help="the training reward model's best.ckpt")
    parser.add_argument("--evaluator", required=True, help="the evaluator reward model's best.ckpt")
    main(**vars(parser.parse_args()))
