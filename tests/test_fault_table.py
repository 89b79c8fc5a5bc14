"""docs/guide/faults.md stays in step with the tests: every test it cites exists, and every case of
tests/test_errors.py is in it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "guide" / "faults.md"
CITED_TEST = re.compile(r"`tests/(test_\w+\.py)::(test_\w+)`")
CITED_CASE = re.compile(r"`tests/test_errors\.py\[(\w+)\]`")


def _test_functions(file: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / file).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_fault_table_cites_exists():
    text = TABLE.read_text()
    cited = CITED_TEST.findall(text)
    assert len(cited) > 20, "the table should cite its tests as `tests/<file>.py::<test>`"
    missing = [f"{file}::{name}" for file, name in cited if name not in _test_functions(file)]
    assert not missing, f"docs/guide/faults.md cites tests that do not exist: {missing}"


def test_every_cli_error_case_is_in_the_fault_table_and_every_cited_case_exists():
    from tests.test_errors import CASES

    cited = set(CITED_CASE.findall(TABLE.read_text()))
    assert not set(CASES) - cited, f"add these tests/test_errors.py cases to docs/guide/faults.md: {sorted(set(CASES) - cited)}"
    assert not cited - set(CASES), f"docs/guide/faults.md cites cases that tests/test_errors.py lacks: {sorted(cited - set(CASES))}"


def test_every_row_of_the_fault_table_names_a_test():
    rows = [line for line in TABLE.read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| fault", "| case")) and "---" not in line]
    assert rows
    untested = [row[:80] for row in rows if not (CITED_TEST.search(row) or CITED_CASE.search(row))]
    assert not untested, f"rows without a test: {untested}"
