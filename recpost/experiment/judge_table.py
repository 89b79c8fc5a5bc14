"""The judges' tables of results.md, a pure function of the rows of results.json: how independent the panel is
of the training reward model, and how far it agrees with it where each policy goes.

- **The panel**, one line per judge (its kind, ``recpost.experiment.judging``): its RMSE on the test targets,
  ``rm_error_corr`` (the correlation over test users of its and the training RM's signed errors on the logged
  test ratings, stored on the judge's rows) and ``judge<k>_rm_overlap@10`` (the share of the training RM's top
  10 of the catalog in the judge's top 10; it depends on the user only, so it is the mean over every policy row).
- **Agreement on the recommended items**, one line per method (its setting chosen on validation):
  ``judge<k>_rank_corr@10``, the Spearman correlation of judge ``k``'s and the training RM's predicted ratings
  of the policy's top 10 per test user, next to the training RM's and the judges' ratings of those items.
- **Each judge's rating** of each policy's top 10 (``judge<k>_reward@10``) beside the training RM's: whether
  every judge, not only their mean, follows the training RM's rise.

Mean ± std over seeds. A judge near 1 on all three is a copy of the training RM and cannot tell exploitation
of its errors from a real move to well-rated items; only a judge that can disagree can confirm either.
"""

from __future__ import annotations

import math
import statistics

JUDGE = "judge"
RM_METHODS = ("reward_model", "eval_reward_model", "reward_ensemble", "judge")
PANEL_NOTE = ("Judges: the rating models that score every policy, each trained on its own seed and bootstrap resample "
              "of the users; kind `same_base` is continued from the base checkpoint like the training RM, `scratch` "
              "trains the same model from scratch, `other_backbone` on the other backbone, `mf` is matrix "
              "factorisation. Error corr.: correlation over test users of the judge's and the training RM's signed "
              "errors on the logged test ratings. Top-10 overlap: share of the training RM's own top 10 of the "
              "catalog (history masked) that is in the judge's top 10, mean over test users (the same for every "
              "policy). Mean ± std over seeds.")
AGREEMENT_NOTE = ("Agreement on the items each policy recommends (off the logged support: the user has not rated "
                  "them): Spearman correlation, per test user, of each judge's and the training RM's predicted "
                  "ratings of the policy's top 10, mean over users; the setting chosen on validation, mean ± std over "
                  "seeds. Reward hacking is claimed only where the training RM's rating rises and judges that can "
                  "disagree with it (low overlap and rank correlation here; the error correlation on logged "
                  "ratings is high for any two reasonable models) do not follow.")

RATINGS_NOTE = ("Each judge's mean predicted rating of each policy's top 10 (test users; the setting chosen on "
                "validation, mean ± std over seeds), beside the training RM's (only the methods that train against "
                "it are scored by it): a policy that raises the training RM's rating while judges that can disagree "
                "with it stay at the starting policy's (`base`) exploits the training RM; judges that rise with it "
                "support a real move to better-rated items, as far as they are independent of it.")


def judge_tables(rows: list[dict]) -> list[str]:
    """The tables of the module docstring as lines of markdown (none without judges)."""
    judges: dict[int, list[dict]] = {}
    for r in rows:
        if r["method"] == JUDGE and isinstance(r.get("setting"), dict) and "judge" in r["setting"]:
            judges.setdefault(int(r["setting"]["judge"]), []).append(r)
    if not judges:
        return []
    policy = [r for r in rows if r["method"] not in RM_METHODS and r.get("status") == "ok"]
    lines = [PANEL_NOTE, "", "| judge | kind | runs | test/rmse | error corr. with training RM | top-10 overlap with "
             "training RM |", "|---|---|---|---|---|---|"]
    for k, rs in sorted(judges.items()):
        ok = [r for r in rs if r.get("status") == "ok"]
        kind = rs[0]["setting"].get("kind", "same_base")
        lines.append(f"| judge{k} | {kind} | {len(ok)}/{len(rs)} | {_cell(ok, 'test/rmse')} | "
                     f"{_cell(ok, 'rm_error_corr')} | {_cell(policy, f'test/judge{k}_rm_overlap@10')} |")
    chosen: dict[str, list[dict]] = {}
    for r in policy:
        if r.get("chosen"):
            chosen.setdefault(r["method"], []).append(r)
    corr_cols = [f"test/judge{k}_rank_corr@10" for k in sorted(judges)]
    if not any(c in r for rs in chosen.values() for r in rs for c in corr_cols):
        return lines
    kinds = {k: rs[0]["setting"].get("kind", "same_base") for k, rs in judges.items()}
    cols = [*corr_cols, "test/judge_rank_corr@10", "test/rm_reward@10", "test/judge_reward@10"]
    header = ["method", "setting", "seeds", *(f"judge{k} ({kinds[k]}) rank corr." for k in sorted(judges)),
              "mean rank corr.", "training RM's rating of the top 10", "judges' rating of the top 10"]
    lines += ["", AGREEMENT_NOTE, "", f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for method, rs in chosen.items():
        lines.append(f"| {method} | {_setting(rs)} | {len(rs)} | {' | '.join(_cell(rs, c) for c in cols)} |")
    rating_cols = [f"test/judge{k}_reward@10" for k in sorted(judges)]
    if any(c in r for rs in chosen.values() for r in rs for c in rating_cols):
        header = ["method", "setting", "seeds", "training RM", *(f"judge{k} ({kinds[k]})" for k in sorted(judges))]
        lines += ["", RATINGS_NOTE, "", f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
        for method, rs in chosen.items():
            cells = [_cell(rs, c) for c in ("test/rm_reward@10", *rating_cols)]
            lines.append(f"| {method} | {_setting(rs)} | {len(rs)} | {' | '.join(cells)} |")
    return lines


def _setting(rows: list[dict]) -> str:
    return ", ".join(f"{k}={v}" for k, v in rows[0]["setting"].items()) or "-"


def _cell(rows: list[dict], key: str) -> str:
    """``mean ± std`` of ``key`` over the rows that have it (one value as it is; ``-`` for none)."""
    values = [v for r in rows if isinstance(v := r.get(key), (int, float)) and not isinstance(v, bool)
              and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
