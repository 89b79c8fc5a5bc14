"""Every mistake a user can make on the command line ends the same way: exit code 2 and one line on stderr,
``error: <cause>; <fix>``, never a traceback (the cases of issue 16, each through the real CLI).

The cases run when the first test of this file asks for them, each in its own process through the real
entry point (``tests.helpers.recpost_cases``); each test then checks its own case.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock

from tests.helpers import (
    edited_checkpoint,
    flipped_checkpoint,
    pretrained_checkpoint,
    recpost_cases,
    reward_model_checkpoint,
    tiny_datamodule,
    unwritable_folder,
    write_tiny_config,
)

ROOT = Path(__file__).resolve().parents[1]


class _RunsCode:
    """A pickle that would create a file when loaded without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _assets(folder: Path) -> SimpleNamespace:
    """Tiny data and config, good checkpoints, and every kind of bad file."""
    cfg = write_tiny_config(folder)
    dm = tiny_datamodule(folder)
    a = SimpleNamespace(folder=folder, cfg=str(cfg), pwned=folder / "PWNED")
    good = pretrained_checkpoint(dm, folder / "policy.ckpt")
    rm = reward_model_checkpoint(dm, folder / "rm.ckpt")
    a.good, a.rm = str(good), str(rm)
    a.edited = str(edited_checkpoint(good, folder / "edited.ckpt"))
    a.flipped = str(flipped_checkpoint(good, folder / "flipped.ckpt"))
    a.rm_edited = str(edited_checkpoint(rm, folder / "rm_edited.ckpt"))
    raw = good.read_bytes()
    a.truncated = folder / "truncated.ckpt"
    a.truncated.write_bytes(raw[: len(raw) // 2])
    a.random = folder / "random.ckpt"
    a.random.write_bytes(os.urandom(5000))
    a.empty = folder / "empty.ckpt"
    a.empty.write_bytes(b"")
    a.text = folder / "text.ckpt"
    a.text.write_text("not a checkpoint\n")
    a.folder_ckpt = folder / "folder.ckpt"
    a.folder_ckpt.mkdir()
    a.malicious = folder / "malicious.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(a.pwned)}, a.malicious)
    a.a_file = folder / "a_file"
    a.a_file.write_text("x")
    a.read_only = unwritable_folder(folder)
    a.locked = folder / "locked"
    a.locked.mkdir()
    for name, grid in (("typo", "lamm: [0.5]"), ("zero", "lam: [0, 1.0]")):
        (folder / f"{name}.yaml").write_text(f"name: {name}\npretrain_config: {cfg}\nwandb: false\nmethods:\n"
                                             f"  exp_sft:\n    config: {ROOT / 'configs/method/exp_sft.yaml'}\n"
                                             f"    grid:\n      {grid}\n")
    (folder / "ok.yaml").write_text(f"name: ok\npretrain_config: {cfg}\nwandb: false\nmethods:\n  sft: {{}}\n")
    for name, rows in (("mixed_units", [f"u{r // 4},i{r % 4},4,{1714566600 * (1000 if r == 7 else 1)}" for r in range(8)]),
                       ("short", ["u1,a,4,1", "u1,b,4,2", "u2,a,3,1"])):  # seconds and ms in one column; no long user
        (folder / f"{name}.csv").write_text("user_id,item_id,rating,timestamp\n" + "\n".join(rows) + "\n")
    return a


def _fit(a, *args):
    return ("fit", "--config", a.cfg, *args)


def _test(a, ckpt, *args):
    return ("test", "--config", a.cfg, "--ckpt_path", str(ckpt), *args)


def _ppo(a, rm):
    return _fit(a, "--config", str(ROOT / "configs/method/ppo.yaml"), "--model.init_args.init_from", a.good,
                "--model.init_args.reward_model", rm)


# name -> (command line from the assets, environment, what the one line must say)
CASES = {
    # a checkpoint that is not what it should be, through every way one enters
    "ckpt_truncated": (lambda a: _test(a, a.truncated), {}, "truncated or corrupted"),
    "ckpt_random_bytes": (lambda a: _test(a, a.random), {}, "truncated or corrupted"),
    "ckpt_empty": (lambda a: _test(a, a.empty), {}, "is empty (0 bytes)"),
    "ckpt_text": (lambda a: _test(a, a.text), {}, "not a PyTorch checkpoint"),
    "ckpt_missing": (lambda a: _test(a, a.folder / "nope.ckpt"), {}, "checkpoint not found"),
    "ckpt_a_folder": (lambda a: _test(a, a.folder_ckpt), {}, "is a folder, not a checkpoint file"),
    "ckpt_malicious_pickle": (lambda a: _test(a, a.malicious), {}, "would run Python code when loaded (posix.system)"),
    "ckpt_weights_edited": (lambda a: _test(a, a.edited), {}, "its weights changed after it was saved"),
    "ckpt_bytes_flipped": (lambda a: _test(a, a.flipped), {}, "its weights changed after it was saved"),
    "init_from_weights_edited": (lambda a: _fit(a, "--model.init_args.init_from", a.edited), {},
                                 "model.init_from"),
    "init_from_bytes_flipped": (lambda a: _fit(a, "--model.init_args.init_from", a.flipped), {},
                                "its weights changed after it was saved"),
    "init_from_random_bytes": (lambda a: _fit(a, "--model.init_args.init_from", str(a.random)), {},
                               "truncated or corrupted"),
    "reward_model_weights_edited": (lambda a: _ppo(a, a.rm_edited), {}, "model.reward_model"),
    "eval_reward_model_weights_edited": (lambda a: _test(a, a.good, "--model.init_args.eval_reward_model", a.rm_edited),
                                         {}, "model.eval_reward_model"),
    "training_setting_with_ckpt_path": (lambda a: _test(a, a.good, "--model.init_args.lr", "0.5"), {},
                                       "model.init_args.lr: 0.5 differs from the checkpoint's 0.001"),
    # flags and config values
    "max_epochs_negative": (lambda a: _fit(a, "--trainer.max_epochs", "-5"), {}, "`max_epochs` must be a non-negative"),
    "default_root_dir_is_a_file": (lambda a: _fit(a, "--trainer.default_root_dir", str(a.a_file)), {},
                                   "is a file, not a folder"),
    "default_root_dir_read_only": (lambda a: _fit(a, "--trainer.default_root_dir", str(a.read_only)), {},
                                   "cannot be written"),
    "cache_dir_read_only": (lambda a: _fit(a), {"RECPOST_CACHE_DIR": "READ_ONLY"}, "data cache folder"),
    # the data path (issue 27)
    "timestamps_fit_no_single_unit": (lambda a: _fit(a, "--data.source.init_args.path", str(a.folder / "mixed_units.csv")),
                                      {}, "which fits no single unit"),
    "no_user_long_enough": (lambda a: _fit(a, "--data.source.init_args.path", str(a.folder / "short.csv")), {},
                            "no user has 3 or more interactions"),
    "model_key_typo": (lambda a: _fit(a, "--model.init_args.lrr", "0.1"), {},
                       "model.init_args.lrr: no such option; did you mean lr?"),
    "backbone_key_typo": (lambda a: _fit(a, "--model.init_args.backbone.d_modle", "8"), {},
                          "model.init_args.backbone.d_modle: no such option; did you mean d_model?"),
    "data_key_typo": (lambda a: _fit(a, "--data.max_lenn", "3"), {}, "data.max_lenn: no such option; did you mean data.max_len?"),
    "lam_nan": (lambda a: _fit(a, "--model", "recpost.methods.ExpSFT", "--model.init_args.lam", "nan"), {},
                "model.init_args.lam: must be a finite number"),
    "lam_inf": (lambda a: _fit(a, "--model", "recpost.methods.ExpSFT", "--model.init_args.lam", "inf"), {},
                "model.init_args.lam: must be a finite number"),
    "unknown_command": (lambda a: ("fitt",), {}, "no command 'fitt'; did you mean fit?"),
    # experiments: the whole plan is checked before any work
    "grid_key_typo": (lambda a: ("experiment", "--config", str(a.folder / "typo.yaml"), "--output_dir",
                                 str(a.folder / "out-typo")), {}, "grid.lamm: ExpSFT has no setting 'lamm'; did you mean lam?"),
    "grid_lam_zero": (lambda a: ("experiment", "--config", str(a.folder / "zero.yaml"), "--output_dir",
                                 str(a.folder / "out-zero")), {}, "methods.exp_sft (lam=0): model.lam must be > 0"),
    "output_dir_is_a_file": (lambda a: ("experiment", "--config", str(a.folder / "ok.yaml"), "--output_dir",
                                        str(a.a_file)), {}, "--output_dir"),
    "output_dir_read_only": (lambda a: ("experiment", "--config", str(a.folder / "ok.yaml"), "--output_dir",
                                        str(a.read_only / "out")), {}, "cannot be written"),
    "output_dir_in_use": (lambda a: ("experiment", "--config", str(a.folder / "ok.yaml"), "--output_dir",
                                     str(a.locked)), {}, "in use by another `recpost experiment`"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> tuple[SimpleNamespace, dict]:
    a = _assets(tmp_path_factory.mktemp("errors"))
    cases = {name: (build(a), {k: str(a.read_only / "cache") if v == "READ_ONLY" else v for k, v in env.items()})
             for name, (build, env, _) in CASES.items()}
    with FileLock(str(a.locked / ".experiment.lock")):  # another experiment holds this folder
        return a, recpost_cases(cases, cwd=ROOT)


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_line_and_exit_code_2(outcomes, case):
    a, done = outcomes
    out = done[case]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert CASES[case][2] in lines[0]
    assert not a.pwned.exists()  # the malicious pickle never ran


# ----------------------------------------------------------------------------------- the gate's two exceptions
def test_a_deliberately_edited_checkpoint_loads_only_with_the_override_and_says_so(tmp_path, monkeypatch, caplog):
    from recpost.models.checkpoint import ALLOW_EDITED, read_checkpoint
    from recpost.core.errors import RecpostError

    edited = edited_checkpoint(pretrained_checkpoint(tiny_datamodule(tmp_path), tmp_path / "p.ckpt"), tmp_path / "e.ckpt")
    with pytest.raises(RecpostError, match="its weights changed after it was saved"):
        read_checkpoint(edited, "--ckpt_path")
    monkeypatch.setenv(ALLOW_EDITED, "1")
    assert "state_dict" in read_checkpoint(edited, "--ckpt_path")
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: --ckpt_path {edited}: its weights changed after it was saved; loading it anyway ({ALLOW_EDITED}=1)"]


def test_a_checkpoint_written_before_the_content_hash_loads_with_one_warning(tmp_path, caplog):
    from recpost.models.checkpoint import STAMP, read_checkpoint

    ckpt = torch.load(pretrained_checkpoint(tiny_datamodule(tmp_path), tmp_path / "p.ckpt"), weights_only=True)
    del ckpt[STAMP]
    torch.save(ckpt, tmp_path / "old.ckpt")
    read_checkpoint(tmp_path / "old.ckpt", "model.init_from")
    read_checkpoint(tmp_path / "old.ckpt", "model.init_from")
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: model.init_from {tmp_path / 'old.ckpt'} has no content hash (written before recpost added one): "
        "its weights cannot be verified"]
