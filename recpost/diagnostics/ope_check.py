"""Off-policy estimates of trained policies against their true values: would an analyst with propensities
have ranked the methods correctly?

On real logs a policy's value can only be estimated: from the logged actions, their propensities under the
logging policy ``pi_beta`` and the observed ratings (``recpost.evaluation.off_policy``: IPS, self-normalised
IPS, doubly robust, and the direct method, here with a learned reward model as the direct model). The
simulator knows ``pi_beta`` and ``r*``, so each estimate can be set beside the truth.

**What is estimated.** The logged samples are one per user: the context ``x`` is the user's history before
the held-out item of ``--split`` (test: the last interaction; val: the second to last), the action ``a`` is
that held-out item, its propensity ``pi_beta(a | x)`` is recomputed by the simulator for that history
(``SimulatorTruth.catalog_behavior_logits``: normalised over the whole world, the visit's slate included),
and the reward is the observed rating. Every user counts: ``data.eval_min_rating`` is ignored, since
keeping only the users whose held-out rating is high would select on the reward and bias every estimator.
The target policy is the one recpost's evaluation scores: ``pi(. | x) = softmax`` of its catalog scores,
the history masked when its ``mask_history`` is on (padding always), which is also the policy of
``true_reward_sampled``. Per policy:

- ``true_value``: the mean over the same contexts of ``E_{a ~ pi}[r*(x, a)]``, i.e. the mean of
  ``SimulatorTruth``'s ``true_reward_sampled`` (computed by it, not copied);
- ``rating_value``: the mean of ``E_{a ~ pi}[E[rating | r*(x, a)]]``, what IPS, SNIPS and DR estimate
  without bias (ratings are ``r*`` plus noise, rounded and clipped to 1..5, which moves their mean away
  from ``r*`` near the ends of the scale); NaN in a ``shuffle_ratings`` world, whose ratings no longer
  depend on the item;
- the four estimates with standard errors and the Kish effective sample size of the weights, the mean and
  largest weight, and ``support_deficit``: the mean probability ``pi`` puts on items ``pi_beta`` cannot
  choose (0 unless ``candidates`` limits exposure, or ``mask_history`` is off). IPS, SNIPS and DR see
  nothing of that mass: with a deficit they estimate the value of ``pi`` on ``pi_beta``'s support only;
- over the policies, each estimator's ``ranking_agreement`` with the true values (Kendall's tau-b, the
  share of policy pairs in the true order, whether its best policy is the truly best), and that of
  ``rating_value`` (``ranking.rating_value``): the ranking the unbiased estimators tend to with endless logs.

**Exactness of the propensities.** The simulator draws each user's sequence from ``pi_beta`` without
replacement; the choice at step ``t`` depends on the user, the items before it (the last one drives the
sequential term), the user's exposure set (``candidates``: a hash of the seed and the user) and the
visit's slate (a hash of the seed, the user and ``t``). Sequence lengths come from their own random
stream, independent of the choices, so the held-out item is one draw from ``pi_beta`` at that history.
All of it is recomputed exactly from the history, so the propensities are exact, provided the logged
history is the whole history ``pi_beta`` saw. It is not, and this command refuses, when preprocessing
dropped interactions (filters) or when ``feedback_rate < 1`` (unrated consumptions are missing from the
log, so the history and the step, hence the slate, differ). A logged item with propensity 0 under the
recomputed ``pi_beta`` is refused too (it would mean the histories differ).

**Memory.** Users are taken in blocks whose ``[users, items]`` tensors hold about
``world.BLOCK_ELEMENTS`` floats (16 MiB in fp32), the whole catalog per row at a time, as the simulator's
ground truth does: ~400 users per block for 10^4 items, ~4 for 10^6.

Why not Open Bandit Pipeline: see ``recpost.evaluation.off_policy``.

    python -m recpost.diagnostics.ope_check --config configs/pretrain/sim.yaml --reward_model <RM best.ckpt> \\
        --policy <best.ckpt> [<best.ckpt> ...] [--split test] [--output ope.json]

A policy given as ``name=path`` is shown as ``name``; otherwise its name is its run's folder below the
experiment's ``seed<N>`` folder (``exp_sft/lam0.25``), or the run's root folder (``pretrain-sim``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from recpost.core.batch import EvalBatch
from recpost.models.checkpoint import load_policy, load_reward_model
from recpost.data import RecDataModule
from recpost.data.simulator.world import BLOCK_ELEMENTS
from recpost.core.errors import RecpostError
from recpost.core.files import write_json
from recpost.evaluation.off_policy import (
    Estimate, direct_method, doubly_robust, importance_weights, ips, policy_expectation, ranking_agreement, snips,
)
from recpost.evaluation.ranking import mask_items
from recpost.core.runs import RunFolder

ESTIMATORS = ("ips", "snips", "dr", "dm")
SEED_FOLDER = re.compile(r"seed\d+")


@dataclass
class Policy:
    """A target policy: its name, where it came from, and its catalog scores after each history of an
    evaluation batch ``[B, n_items + 1]`` (fp32, masked as recpost's evaluation masks them)."""

    name: str
    checkpoint: str
    catalog_scores: Callable[[EvalBatch], torch.Tensor]

    @classmethod
    def from_checkpoint(cls, name: str, path: str, dm: RecDataModule) -> Policy:
        """The policy of a checkpoint, scored as ``RecModule.catalog_scores`` scores it (eval mode)."""
        backbone, hp = load_policy(path, dm.item_map_hash, "--policy")
        if hp["n_items"] != dm.n_items:
            raise RecpostError(f"--policy {path} scores {hp['n_items']} items but the data has {dm.n_items}; pass "
                               "the run's own data config")
        mask_history = bool(hp.get("mask_history", True))

        def catalog_scores(batch: EvalBatch) -> torch.Tensor:
            hidden = backbone.encode(batch["input_items"], batch.get("input_ratings"),
                                     batch.get("input_timestamps"))[:, -1]  # [B, d]
            scores = backbone.score_columns(hidden, slice(None))  # [B, V + 1], padding -inf
            return mask_items(scores, batch["history_items"]) if mask_history else scores

        return cls(name, str(path), catalog_scores)


def policy_name(checkpoint: str | Path) -> str:
    """A policy's name from its checkpoint's place: the run folders below an experiment's ``seed<N>``
    (``exp_sft/lam0.25``; the stage's ``fit`` folder left out), else the run's root folder, else the file name."""
    run = RunFolder.of_checkpoint(checkpoint)
    if run is None:
        return Path(checkpoint).stem
    parts = run.path.parent.parent.parts  # the run's root: <...>/<root>/lightning_logs/version_N
    if parts[-1] == "fit":
        parts = parts[:-1]
    seeds = [i for i, part in enumerate(parts) if SEED_FOLDER.fullmatch(part)]
    if seeds and seeds[-1] < len(parts) - 1:
        return "/".join(parts[seeds[-1] + 1:])
    return parts[-1]


def named_checkpoints(specs: list[str]) -> dict[str, str]:
    """``name=path`` or ``path`` specs -> ``{name: path}`` in order; one-line error on a repeated name."""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not (sep and name and not Path(spec).exists()):
            name, path = policy_name(spec), spec
        if name in named:
            raise RecpostError(f"--policy: two policies are named {name!r} ({named[name]} and {path}); name them "
                               "with name=path")
        named[name] = path
    return named


def check_exact_propensities(dm: RecDataModule) -> None:
    """Refuse data whose logged histories are not the ones ``pi_beta`` saw (see the module docstring)."""
    truth = dm.ground_truth
    if truth is None:
        raise RecpostError(f"off-policy check needs simulator data (pi_beta and r* known); the data source is "
                           f"{type(dm.source).__name__}: use a config whose data source is recpost.data.Simulator")
    data, world = dm.data, truth.world
    if world.config.feedback_rate < 1:
        raise RecpostError(f"off-policy check: feedback_rate={world.config.feedback_rate:g} leaves unrated "
                           "consumptions out of the log, so pi_beta's propensity at a logged history cannot be "
                           "recomputed; use a world with feedback_rate 1")
    raw = data.meta.get("raw_rows", len(data.item))
    if len(data.item) != raw:
        raise RecpostError(f"off-policy check: preprocessing kept {len(data.item)} of {raw} generated interactions, "
                           "so the histories differ from those pi_beta saw; use min_interactions 0 and no filters")


@torch.no_grad()
def logged_samples(dm: RecDataModule, policies: list[Policy], reward_model: str,
                   split: Literal["val", "test"] = "test") -> dict[str, Any]:
    """Per logged sample (one per user) ``[N]`` tensors: ``reward``, ``behavior_prob``, ``q_logged``, and per
    policy name ``target_prob``, ``q_target``, ``true_value``, ``rating_value``, ``support_deficit``."""
    check_exact_propensities(dm)
    truth = dm.ground_truth
    world = truth.world
    rm = load_reward_model(reward_model, dm.item_map_hash, "--reward_model")
    users = np.arange(dm.data.n_users)  # every user: see the module docstring on eval_min_rating
    rows = max(1, BLOCK_ELEMENTS // max(world.n_items, dm.n_items + 1))
    catalog = truth.world_item[1:]  # [V] world item of internal item j at column j - 1
    shared: dict[str, list[torch.Tensor]] = {"reward": [], "behavior_prob": [], "q_logged": []}
    per_policy = {p.name: {k: [] for k in ("target_prob", "q_target", "true_value", "rating_value", "support_deficit")}
                  for p in policies}
    for start in range(0, len(users), rows):
        batch = dm.eval_batch(users[start:start + rows], split)
        target = batch["target_item"]  # [B] internal ids 1..V
        log_beta = truth.catalog_behavior_logits(batch["user_index"], batch["history_items"])  # [B, V] log pi_beta
        behavior_prob = log_beta.gather(1, (target - 1)[:, None]).squeeze(1).double().exp()  # [B]
        if not bool((behavior_prob > 0).all()):
            raise RecpostError("off-policy check: a logged item has propensity 0 under the recomputed pi_beta, so the "
                               "logged histories are not the ones the simulator generated; regenerate the data")
        q = rm.predict_rewards(batch["input_items"], batch["input_ratings"], None,
                               batch["input_timestamps"]).float()[:, 1:]  # [B, V]
        r_star = truth.catalog_reward(batch["user_index"], batch["history_items"])  # [B, V]
        expected_rating = (torch.full_like(r_star, math.nan) if world.config.shuffle_ratings
                           else world.expected_rating(r_star, catalog.expand_as(r_star)))  # [B, V]
        unreachable = torch.isneginf(log_beta)  # [B, V]: items pi_beta cannot choose here
        shared["reward"].append(batch["target_rating"].double())
        shared["behavior_prob"].append(behavior_prob)
        shared["q_logged"].append(q.gather(1, (target - 1)[:, None]).squeeze(1))
        for policy in policies:
            scores = policy.catalog_scores(batch)  # [B, V + 1]
            pi = torch.softmax(scores, dim=1)[:, 1:]  # [B, V]
            log_pi_logged = torch.log_softmax(scores, dim=1).gather(1, target[:, None]).squeeze(1)  # [B]
            out = per_policy[policy.name]
            out["target_prob"].append(log_pi_logged.double().exp())
            out["q_target"].append(policy_expectation(pi, q))
            out["true_value"].append(truth.evaluate(batch, scores)["true_reward_sampled"].double())
            out["rating_value"].append(policy_expectation(pi, expected_rating))
            out["support_deficit"].append((pi.double() * unreachable).sum(1))
    return {**{k: torch.cat(v) for k, v in shared.items()},
            "policies": {name: {k: torch.cat(v) for k, v in cols.items()} for name, cols in per_policy.items()}}


def _estimate(e: Estimate) -> dict[str, float]:
    return {"value": e.value, "stderr": e.stderr, "ess": e.ess}


def _mean(values: torch.Tensor) -> dict[str, float]:
    return {"value": float(values.mean()), "stderr": float(values.std()) / math.sqrt(len(values))
            if len(values) > 1 else math.nan}


def estimate_policies(samples: dict[str, Any]) -> dict[str, Any]:
    """Each policy's estimates and true values, and each estimator's ranking of the policies against the truth."""
    reward, behavior, q_logged = samples["reward"], samples["behavior_prob"], samples["q_logged"]
    out: dict[str, Any] = {}
    for name, cols in samples["policies"].items():
        target = cols["target_prob"]
        w = importance_weights(target, behavior)
        out[name] = {
            "true_value": _mean(cols["true_value"]), "rating_value": _mean(cols["rating_value"]),
            "support_deficit": float(cols["support_deficit"].mean()),
            "mean_weight": float(w.mean()), "max_weight": float(w.max()),
            "estimates": {
                "ips": _estimate(ips(reward, target, behavior)),
                "snips": _estimate(snips(reward, target, behavior)),
                "dr": _estimate(doubly_robust(reward, target, behavior, q_logged, cols["q_target"])),
                "dm": _estimate(direct_method(cols["q_target"])),
            },
        }
    true = torch.tensor([p["true_value"]["value"] for p in out.values()])
    ranking = {est: ranking_agreement(torch.tensor([p["estimates"][est]["value"] for p in out.values()]), true)
               for est in ESTIMATORS}
    # What the unbiased estimators converge to ranks the policies so: the best they can do with endless logs.
    ranking["rating_value"] = ranking_agreement(torch.tensor([p["rating_value"]["value"] for p in out.values()]), true)
    return {"policies": out, "ranking": ranking}


def print_report(report: dict[str, Any]) -> None:
    """The per-policy table and the ranking lines, with rich (plain text when not on a terminal)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"off-policy estimates vs truth ({report['split']}: {report['contexts']} logged samples, "
                        f"mean rating {report['logged_mean_rating']:.3f})")
    for column in ("policy", "true r*", "E[rating]", *(e.upper() for e in ESTIMATORS), "ESS", "max w", "deficit"):
        table.add_column(escape(column), justify="left" if column == "policy" else "right")
    for name, p in report["policies"].items():
        est = p["estimates"]
        table.add_row(escape(name), f"{p['true_value']['value']:.3f}", f"{p['rating_value']['value']:.3f}",
                      *(f"{est[e]['value']:.3f} ± {est[e]['stderr']:.3f}" for e in ESTIMATORS),
                      f"{est['ips']['ess']:.0f}", f"{p['max_weight']:.3g}", f"{p['support_deficit']:.3f}")
    console = Console(width=max(160, Console().width))
    console.print(table)
    for name, r in report["ranking"].items():
        label = escape(f"{'E[rating]' if name == 'rating_value' else name.upper():>9}")
        console.print(f"{label}: Kendall tau {r['kendall_tau']:+.2f}, pairs in the true order "
                      f"{r['pairs_in_order']:.2f}, best policy found: {'yes' if r['best_found'] == 1 else 'no'}")


def main(config: list[str], policy: list[str], reward_model: str, split: Literal["val", "test"] = "test",
         output: str | None = None) -> dict[str, Any]:
    """Off-policy estimates (IPS, SNIPS, DR, DM) of trained policies beside their true values (simulator data).

    Args:
        config: fit config(s) whose data: sections describe the simulator world (composed in order).
        policy: policy checkpoints (best.ckpt of SFT, ExpSFT, PPO, DPO, ...), each ``path`` or ``name=path``.
        reward_model: a RewardModel best.ckpt, the direct model of DR and DM.
        split: whose held-out items are the logged actions: ``test`` (last) or ``val`` (second to last).
        output: a JSON file to write the report to.
    """
    if split not in ("val", "test"):
        raise RecpostError(f"--split must be val or test (got {split!r})")
    if not policy:
        raise RecpostError("--policy: give at least one policy checkpoint (best.ckpt of SFT, ExpSFT, PPO, DPO, ...)")
    dm = RecDataModule.from_configs(config)
    check_exact_propensities(dm)
    policies = [Policy.from_checkpoint(name, path, dm) for name, path in named_checkpoints(policy).items()]
    samples = logged_samples(dm, policies, reward_model, split)
    report = {"split": split, "contexts": len(samples["reward"]),
              "logged_mean_rating": float(samples["reward"].mean()), "reward_model": str(reward_model),
              "checkpoints": {p.name: p.checkpoint for p in policies}, **estimate_policies(samples)}
    print_report(report)
    if output:
        write_json(Path(output).expanduser(), report)
    return report


if __name__ == "__main__":
    import argparse  # a few flags, two of them repeated: the standard library's parser is enough
    import sys

    parser = argparse.ArgumentParser(prog="python -m recpost.diagnostics.ope_check", description=main.__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="a fit config with the simulator data "
                        "(repeat to compose)")
    parser.add_argument("--policy", action="extend", nargs="+", required=True,
                        help="policy checkpoints, each PATH or NAME=PATH (repeat the flag or list several)")
    parser.add_argument("--reward_model", required=True, help="a RewardModel best.ckpt: the direct model of DR and DM")
    parser.add_argument("--split", choices=("val", "test"), default="test",
                        help="logged actions: each user's test (last) or validation (second to last) item")
    parser.add_argument("--output", help="write the report as JSON to this file")
    try:
        main(**vars(parser.parse_args()))
    except RecpostError as exc:  # a user-fixable problem: one line, as the recpost CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
