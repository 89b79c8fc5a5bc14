"""The documentation site: every results table in it is `recpost report`'s rendering of a results.json kept
beside it, the site builds with `mkdocs build --strict`, and the README's commands are CI's."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recpost.experiment.render import REGIMES_JSON, REGIMES_MD, RESULTS_JSON, RESULTS_MD
from recpost.experiment.rerender import report

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Each snapshot folder: docs/results/<study>/ with results.json (a study) or regimes.json (a regime map).
SNAPSHOTS = sorted({p.parent for name in (RESULTS_JSON, REGIMES_JSON) for p in DOCS.glob(f"results/*/{name}")})
INCLUDE = re.compile(r'^--8<-- "results/([^/"]+)/(?:results|regimes)\.md"$', re.M)


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


@pytest.mark.parametrize("folder", SNAPSHOTS, ids=lambda p: p.name)
def test_every_results_table_in_the_docs_is_its_snapshot_rendered(folder, tmp_path):
    for name in (RESULTS_JSON, REGIMES_JSON):
        if (folder / name).is_file():
            shutil.copy(folder / name, tmp_path / name)
    report(str(tmp_path))
    for name in (RESULTS_MD, REGIMES_MD):
        if (tmp_path / name).is_file():
            assert (folder / name).is_file(), f"{folder / name} is missing; run `recpost report {folder.relative_to(ROOT)}`"
            assert (folder / name).read_text() == (tmp_path / name).read_text(), (
                f"{folder / name} is not what its snapshot renders (edited by hand?); run `recpost report "
                f"{folder.relative_to(ROOT)}`")


def test_the_results_pages_show_only_rendered_tables():
    """A study's page includes its rendered tables and types none of its own; every snapshot is shown."""
    shown = set()
    for page in sorted(DOCS.glob("results/*.md")):
        text = page.read_text()
        included = INCLUDE.findall(text)
        if not included:
            continue
        shown.update(included)
        typed = [line for line in _outside_code(text) if line.startswith("|")]
        assert not typed, f"{page.relative_to(ROOT)} has a table typed by hand: {typed[0][:80]}"
    assert {p.name for p in SNAPSHOTS} <= shown, f"snapshots no page includes: {sorted({p.name for p in SNAPSHOTS} - shown)}"


def test_the_readme_headline_table_is_the_rendered_one():
    readme = (ROOT / "README.md").read_text()
    source, block = re.search(r"<!-- headline: (\S+) -->\n(.*?)\n<!-- /headline -->", readme, re.S).groups()
    rendered = [line for line in (DOCS / source).read_text().split("\n\n") if line.startswith("|")][0]
    assert block == rendered, f"the README's headline table is not {source}'s first table; copy it from there"


def test_the_readme_quick_start_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[dev]" && recpost experiment' in readme
    ci_test = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m pytest")][-1]
    command = ci_test.removeprefix("python -m ")
    assert re.search(rf"^{re.escape(command)}(\s|$)", readme, re.M), f"the README's test command is not .ci/run's: {command}"


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings_handlers")),
                    reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_the_site_builds_strictly(tmp_path):
    """No broken link or anchor, no page missing from the nav, no nav entry without a page, no docstring the
    API reference cannot read (mkdocs.yml turns each of them into a warning; --strict fails on one)."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
                           "--config-file", str(ROOT / "mkdocs.yml")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "results" / "sim" / "index.html").is_file()
