"""The interactions cache is built once when several processes (DDP ranks, nodes) start together."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from recpost.data import Table
from recpost.data.cache import build_cache
from recpost.data.interactions import PreprocessOptions
from tests.helpers import write_tiny_interactions


class CountingTable(Table):
    """A Table that appends a line to ``log`` each time it is read (i.e. each time a cache is built)."""

    def __init__(self, path: str, log: str) -> None:
        super().__init__(path, name="counted")
        self.log = log

    def load(self):
        with open(self.log, "a") as fh:
            fh.write("load\n")
        return super().load()


def _build(csv: str, log: str, cache: str, start, results) -> None:
    start.wait()  # all processes ask at the same moment
    results.put(str(build_cache(CountingTable(csv, log), PreprocessOptions(), Path(cache))))


def test_processes_starting_together_build_the_cache_once(tmp_path):
    csv = str(write_tiny_interactions(tmp_path / "t.csv"))
    log, cache = str(tmp_path / "loads.log"), str(tmp_path / "cache")
    ctx = mp.get_context("fork")
    start, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_build, args=(csv, log, cache, start, results)) for _ in range(3)]
    for p in procs:
        p.start()
    paths = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(paths)) == 1 and (Path(paths[0]) / "meta.json").is_file()
    assert Path(log).read_text().count("load") == 1
    assert [p.name for p in Path(cache).iterdir() if p.name.startswith(".") and p.name != ".locks"] == []
