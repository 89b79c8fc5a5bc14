"""The package as a user gets it: the sdist and the wheel built from the sources, checked as PyPI would
(``twine check``), the wheel installed into a fresh virtual environment, and the main job run from an
empty folder outside the checkout, with no data directory.

The virtual environment reuses this interpreter's packages (``--system-site-packages``: torch and the
other dependencies are not downloaded again) and gets recpost from the wheel alone (``--no-deps``); the
test checks that ``import recpost`` there is the wheel's, not this checkout's editable install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import recpost
from recpost.experiment.launch import Launcher

ROOT = Path(__file__).resolve().parents[1]
# What the sdist is built from: the files a source release carries (MANIFEST.in names the changelog).
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in", "recpost"]
TINY_WORLD = ["--data.source.init_args.world.n_users", "100", "--data.source.init_args.world.n_items", "100",
              "--data.source.init_args.min_seq_len", "8", "--data.source.init_args.max_seq_len", "16",
              "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false"]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, f"{args}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_the_version_has_one_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "recpost.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", recpost.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{recpost.__version__}]" in changelog


@pytest.mark.slow
def test_the_wheel_runs_the_main_job_from_an_empty_folder(tmp_path):
    pytest.importorskip("build", reason="python -m build: pip install -e '.[dev]'")
    pytest.importorskip("twine", reason="twine check: pip install -e '.[dev]'")
    src, dist = tmp_path / "src", tmp_path / "dist"
    for name in SOURCES:  # a copy: building in the checkout would write build/ and egg-info into the shared tree
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # The sdist, then the wheel built from the unpacked sdist: a file the sdist lacks fails the wheel too.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)])
    version = recpost.__version__
    wheel, sdist = dist / f"recpost-{version}-py3-none-any.whl", dist / f"recpost-{version}.tar.gz"
    check = _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])
    assert check.stdout.count("PASSED") == 2, check.stdout

    in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"README.md", "LICENSE", "CHANGELOG.md", "recpost/configs/experiments/sim.yaml"} <= in_sdist
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "recpost" / "configs").rglob("*.yaml")}
    assert shipped <= in_wheel and f"recpost-{version}.dist-info/licenses/LICENSE" in in_wheel

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python, script = venv / "bin" / "python", venv / "bin" / "recpost"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--ignore-installed",
          "--no-index", "--quiet", str(wheel)])
    empty, no_data = tmp_path / "empty", tmp_path / "no-data"
    empty.mkdir()
    no_data.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(RECPOST_DATA_DIR=str(no_data), RECPOST_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1")
    where = _run([str(python), "-c", "import importlib.metadata as m, recpost; "
                  "print(recpost.__file__, recpost.__version__, m.version('recpost'))"], cwd=empty, env=env)
    file, runtime_version, metadata_version = where.stdout.split()
    assert Path(file).is_relative_to(venv) and runtime_version == metadata_version == version

    # The commands through the package's entry point (recpost.cli.main), each forked by the wheel's own
    # launcher (recpost.cli.zygote under the venv's python), which imported recpost once: an interpreter
    # start and the imports cost seconds each on 2 loaded cores. The console script calls the same main.
    assert "from recpost.cli import main" in script.read_text()
    cases = {"version": ["--version"], "configs": ["configs"], "dry run": ["experiment", "--dry-run"],
             "fit": ["fit", "--config", "pretrain/sim", *TINY_WORLD, "--trainer.default_root_dir", "runs/tiny"]}
    launcher = Launcher(env, lambda: None, python=str(python), cwd=str(empty))
    try:
        results = {}
        for name, args in cases.items():
            out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
            code = launcher.start(args, out, err=str(err), env=env, cwd=str(empty)).wait(timeout=300)
            results[name] = {"code": code, "out": out.read_text(), "err": err.read_text()}
    finally:
        launcher.close()
    for name, r in results.items():
        assert r["code"] == 0, f"{name}:\n{r['out'][-2000:]}\n{r['err'][-3000:]}"
    assert results["version"]["out"] == f"recpost {version}\n"
    package_configs = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "recpost" / "configs"
    assert f"shipped configs ({package_configs})" in results["configs"]["out"]
    assert "\nexperiments/\n  amazon_books.yaml" in results["configs"]["out"]
    assert results["dry run"]["out"].startswith("experiment sim: ")
    assert f"--config {package_configs / 'pretrain' / 'sim.yaml'}" in results["dry run"]["out"]
    assert (empty / "runs" / "tiny" / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt").is_file()
    assert not (empty / "runs" / "experiments").exists()  # a dry run writes nothing
