"""Which validation of a run was chosen, and what its starting weights scored, read back from its metrics.csv.

``recpost fit`` keeps as ``best.ckpt`` the validation with the best monitored value, the earliest of equal ones
(Lightning replaces the best only on a strict improvement), the starting weights included when the fit
validated before its first update (``recpost.cli.callbacks.ValidationSchedule``: on by default for a model
continued from ``init_from``). The same rule here gives the validation metrics a study reports with that
checkpoint, its optimiser steps (``chosen_step``: 0 is the starting policy kept, no update beat it) and the
monitored value before any update (``val_at_start``). Since the candidates include step 0, the chosen value is
never worse than ``val_at_start``: post-training can only be reported as no improvement, never as a loss it
could have avoided by keeping its start.
"""

from __future__ import annotations

import csv
from pathlib import Path

from recpost.core.errors import RecpostError

# What the fit logs at each validation (recpost.cli.callbacks.OPTIMIZER_STEPS; the layers keep the
# experiment from importing the CLI): the optimiser steps taken before it.
OPTIMIZER_STEPS = "time/optimizer_steps"


def validation_rows(metrics_csv: Path, monitor: str) -> list[dict[str, str]]:
    """The rows of ``metrics_csv`` that hold ``monitor`` (one per validation), in the order they were logged."""
    with Path(metrics_csv).open() as fh:
        return [r for r in csv.DictReader(fh) if r.get(monitor)]


def best_row(rows: list[dict[str, str]], monitor: str, mode: str = "max") -> dict[str, str]:
    """The validation ``best.ckpt`` holds: the best ``monitor`` (highest, or lowest for ``min``), the earliest
    of equal ones."""
    return (max if mode == "max" else min)(rows, key=lambda r: float(r[monitor]))  # both keep the first best


def best_validation(metrics_csv: Path, monitor: str, mode: str = "max") -> dict[str, float]:
    """All ``val/`` metrics of the validation with the best monitored value (highest, or lowest for ``min``)."""
    rows = validation_rows(metrics_csv, monitor)
    if not rows:
        raise RecpostError(f"{metrics_csv} has no {monitor}")
    return {k: float(v) for k, v in best_row(rows, monitor, mode).items() if k.startswith("val/") and v != ""}


def selection(metrics_csv: str | Path | None, monitor: str, mode: str = "max") -> dict[str, float | int | None]:
    """``chosen_step`` (optimiser steps of the chosen validation; 0: the starting weights) and ``val_at_start``
    (``monitor`` before the first update; None when the fit did not validate its start). Both None when the
    file or its steps are missing (a run from before steps were logged)."""
    none = {"chosen_step": None, "val_at_start": None}
    if not metrics_csv or not Path(metrics_csv).is_file():
        return none
    rows = [r for r in validation_rows(Path(metrics_csv), monitor) if r.get(OPTIMIZER_STEPS)]
    if not rows:
        return none
    start = next((r for r in rows if float(r[OPTIMIZER_STEPS]) == 0), None)
    return {"chosen_step": int(float(best_row(rows, monitor, mode)[OPTIMIZER_STEPS])),
            "val_at_start": float(start[monitor]) if start is not None else None}
