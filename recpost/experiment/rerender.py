"""``recpost report DIR``: a study's results.md (and a regime map's regimes.md) rendered again from the JSON
beside it, byte for byte what ``recpost experiment`` wrote (:mod:`.render`, :mod:`.regime_tables`)."""

from __future__ import annotations

import json
from pathlib import Path

from recpost.core.errors import RecpostError
from recpost.experiment.regime_tables import render_regimes
from recpost.experiment.render import REGIMES_JSON, REGIMES_MD, RESULTS_JSON, RESULTS_MD, render_results


def report(results_dir: str) -> Path:
    """Render a study's results.md again from its results.json (the tables `recpost experiment` writes).

    A regime map's folder (with ``regimes.json``) gets its ``regimes.md`` rendered again the same way.

    Args:
        results_dir: the folder holding the study's ``results.json`` (an experiment's output folder, a seed
            folder of ``--only_seed``, a regime map's folder, or a snapshot kept elsewhere); the Markdown is
            written beside it.
    """
    folder = Path(results_dir)
    written = []
    if (folder / REGIMES_JSON).is_file():
        summary = _read_json(folder / REGIMES_JSON, dict, "a regime map's summary")
        written.append(folder / REGIMES_MD)
        written[-1].write_text(render_regimes(summary))
    if (folder / RESULTS_JSON).is_file() or not written:
        rows = _read_json(folder / RESULTS_JSON, list, "a list of result rows")
        if not all(isinstance(r, dict) and "method" in r for r in rows):
            raise RecpostError(f"{folder / RESULTS_JSON} is not a list of result rows; give the results.json of a "
                               "`recpost experiment` run")
        written.append(folder / RESULTS_MD)
        written[-1].write_text(render_results(rows))
    for path in written:
        print(f"results: {path}", flush=True)
    return written[-1]


def _read_json(path: Path, kind: type, what: str):
    if not path.is_file():
        raise RecpostError(f"{path} does not exist; give the output folder of a `recpost experiment` run")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecpostError(f"{path} is not JSON ({exc}); re-run the experiment to write it again") from None
    if not isinstance(value, kind):
        raise RecpostError(f"{path} is not {what}; give the output folder of a `recpost experiment` run")
    return value


def report_command(args: list[str]) -> None:
    """Render a study's results.md again from its results.json (recpost report DIR)

    ``recpost report DIR``: the folder is the one positional argument, so this command parses its own
    arguments (the typed-function commands take options only).
    """
    if args in (["-h"], ["--help"]):
        print("usage: recpost report DIR\n\n" + report.__doc__.split("Args:")[0].strip()
              + "\n\nDIR: the folder holding results.json (an experiment's output folder, a seed folder of "
                "--only_seed, or a snapshot); results.md is written beside it.")
        return
    if len(args) != 1 or args[0].startswith("-"):
        raise RecpostError(f"recpost report takes one folder, the one holding results.json (got {' '.join(args) or 'none'}); "
                           "e.g. recpost report runs/experiments/sim")
    report(args[0])
