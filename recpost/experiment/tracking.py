"""Weights & Biases for an experiment: the mode, each stage's logger config, the results table.

Named ``tracking`` so that ``import wandb`` inside this package still means the W&B package.
"""

from __future__ import annotations

import json
import netrc
import os
from collections.abc import Callable
from pathlib import Path

from recpost.core.files import write_text
from recpost.experiment.study import Study


def wandb_mode() -> tuple[str, str | None]:
    """(mode, message): ``WANDB_MODE`` when set; else online with an API key, offline without one."""
    mode = os.environ.get("WANDB_MODE")
    if mode == "disabled":
        return "disabled", "W&B disabled (WANDB_MODE=disabled): CSV logs only"
    if mode:
        return mode, None
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            has_key = False
    if has_key:
        return "online", None
    return "offline", ("W&B: no API key (WANDB_API_KEY or `wandb login`), logging offline into each stage's "
                       "wandb/ folder; upload later with `wandb sync <folder>`")


def wandb_settings(study: Study, mode: str) -> dict | None:
    """Project, entity and group of the study's W&B runs; None when W&B is off (config or mode)."""
    if study.wandb is None or mode == "disabled":
        return None
    return {"project": study.wandb.get("project", "recpost"), "entity": study.wandb.get("entity"),
            "group": study.wandb.get("group", study.name)}


def logger_config(path: Path, csv_dir: Path, wandb: dict | None, run_name: str, run_id: str, job: str) -> Path:
    """A config fragment with the stage's loggers: CSV always (first, so it owns ``log_dir``), W&B too."""
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(csv_dir)}}]
    if wandb is not None:
        loggers.append({"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {
            "project": wandb["project"], "entity": wandb.get("entity"), "group": wandb["group"], "name": run_name,
            "id": run_id, "job_type": job, "save_dir": str(path.parent), "resume": "allow"}})
    # JSON (which YAML reads) so every string stays quoted: PyYAML writes a run id such as 8885523638e8 bare,
    # and jsonargparse's YAML loader reads that back as the number 8.885523638e+17 (a refused fit)
    write_text(path, json.dumps({"trainer": {"logger": loggers}}, indent=2) + "\n")
    return path


def log_results(wandb_cfg: dict, mode: str, name: str, out: Path, say: Callable[[str], None]) -> None:
    """The results table and figures, as one more run of the experiment's W&B group."""
    import wandb

    try:
        run = wandb.init(project=wandb_cfg["project"], entity=wandb_cfg["entity"], group=wandb_cfg["group"],
                         name=f"{name}-results", job_type="results", dir=str(out), mode=mode, reinit="finish_previous")
        rows = json.loads((out / "results.json").read_text())
        cols = sorted({k for r in rows for k in r if k != "metrics_csv"})
        run.log({"results": wandb.Table(columns=cols, data=[[json.dumps(r.get(c)) if isinstance(r.get(c), (dict, list))
                                                             else r.get(c) for c in cols] for r in rows]),
                 **{f"figures/{p.stem}": wandb.Image(str(p)) for p in sorted((out / "figures").glob("*.png"))}})
        run.finish()
    except Exception as exc:  # noqa: BLE001 - the results are written already; W&B trouble must not hide them
        say(f"W&B: could not log the results table ({exc}); the files in {out} are complete")
