"""The codebase's shape as a checked contract: layers, no import cycles, small files.

The layers are import-linter contracts in pyproject.toml (docs/architecture.md explains them); a
future upward import or cycle fails here, not in review.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400  # a file a newcomer reads in one sitting; split by responsibility beyond this


def test_the_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint) if lint.exists() else "lint-imports", "--config", str(ROOT / "pyproject.toml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_no_module_of_recpost_is_part_of_an_import_cycle():
    graph = grimp.build_graph("recpost", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("recpost") and graph.chain_exists(importer=imported, imported=module):
                cycles.append(graph.find_shortest_chain(importer=imported, imported=module) + (imported,))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(chain) for chain in cycles)


def test_an_upward_import_would_be_caught(tmp_path):
    # The contract is not vacuous: a copy of the layers with one upward import (data -> methods) breaks.
    graph = grimp.build_graph("recpost", cache_dir=None)
    graph.add_import(importer="recpost.data.datamodule", imported="recpost.methods.base")
    illegal = graph.find_illegal_dependencies_for_layers(
        layers=("recpost.methods", "recpost.data"), containers=set()
    )
    assert illegal


def test_no_file_in_recpost_is_longer_than_a_newcomer_reads_at_once():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "recpost").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by responsibility: {long}"
