"""Shipped configs: package data named from any folder (recpost.core.configs), `recpost configs` to list and
copy them, and `$RECPOST_DATA_DIR/<folder>` data roots."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recpost.cli.configs import copy_config, listing
from recpost.core.configs import config_args, description, find_config, shipped, shipped_dir, shipped_in, shipped_names
from recpost.core.errors import RecpostError
from recpost.data.sources import MovieLens, _resolve_root

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_CONFIGS = ROOT / "recpost" / "configs"


def test_every_yaml_in_the_package_folder_is_a_shipped_config():
    on_disk = sorted(p.relative_to(PACKAGE_CONFIGS).as_posix() for p in PACKAGE_CONFIGS.rglob("*.yaml"))
    assert shipped_names() == on_disk and "experiments/sim.yaml" in on_disk
    assert shipped_in("method")[:2] == ["asft", "dpo"] and "exp_sft" in shipped_in("method")


def test_the_checkout_configs_folder_is_the_package_folder_through_its_symlink():
    # The paths a study hashes into its stage keys stay what they were before the configs moved.
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == PACKAGE_CONFIGS.resolve()
    assert shipped_dir() == ROOT / "configs"


@pytest.mark.parametrize("name", ["experiments/paper_ml1m.yaml", "experiments/paper_ml1m",
                                  "configs/experiments/paper_ml1m.yaml", "../experiments/paper_ml1m.yaml"])
def test_a_shipped_config_has_several_spellings(name):
    assert shipped(name) == shipped_dir() / "experiments" / "paper_ml1m.yaml"


@pytest.mark.parametrize("name", ["paper_ml1m", "experiments/nope.yaml", "/etc/experiments/paper_ml1m.yaml", ""])
def test_what_is_no_shipped_name(name):
    assert shipped(name) is None


def test_a_file_that_exists_wins_over_the_shipped_config(tmp_path):
    mine = tmp_path / "experiments" / "sim.yaml"
    mine.parent.mkdir()
    mine.write_text("name: mine\n")
    assert find_config("experiments/sim.yaml", tmp_path) == mine
    assert find_config("experiments/sim.yaml", tmp_path / "elsewhere") == shipped_dir() / "experiments" / "sim.yaml"


def test_an_unknown_config_is_one_line_with_the_shipped_names_it_may_mean(tmp_path):
    with pytest.raises(RecpostError) as info:
        find_config("sim.yaml", tmp_path)
    message = str(info.value)
    assert message.startswith(f"config file not found: sim.yaml (looked in {tmp_path} and the shipped configs)")
    assert "did you mean data/sim.yaml, experiments/sim.yaml or pretrain/sim.yaml?" in message
    assert "recpost configs" in message and "\n" not in message


def test_config_args_replace_shipped_names_and_keep_files_and_inline_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("seed_everything: 1\n")
    args = ["fit", "--config", "pretrain/sim", "-c", "mine.yaml", "--config=configs/trainer/cpu.yaml",
            "--config", "trainer: {max_epochs: 1}", "--trainer.max_epochs", "3"]
    assert config_args(args) == [
        "fit", "--config", str(shipped_dir() / "pretrain" / "sim.yaml"), "-c", "mine.yaml",
        f"--config={shipped_dir() / 'trainer' / 'cpu.yaml'}", "--config", "trainer: {max_epochs: 1}",
        "--trainer.max_epochs", "3"]
    with pytest.raises(RecpostError, match="config file not found: pretrain/simm"):
        config_args(["fit", "--config", "pretrain/simm"])


def test_description_is_the_first_sentence_of_the_opening_comment(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text("# Online DPO, as Chidambaram et al. (2026) ran it: pairs\n# at every step. More here.\n"
                      "#   recpost fit --config x.yaml\nmodel: {}\n")
    assert description(config) == "Online DPO, as Chidambaram et al. (2026) ran it: pairs at every step"
    config.write_text("model: {}\n# a comment later\n")
    assert description(config) == ""


def test_listing_shows_every_shipped_config_once_under_its_folder():
    lines = listing().splitlines()
    for name in shipped_names():
        folder, file = name.rsplit("/", 1)
        rows = [i for i, line in enumerate(lines) if line.split()[:1] == [file]]
        heads = [i for i, line in enumerate(lines) if line == f"{folder}/"]
        assert len(heads) == 1 and any(i > heads[0] and all(not lines[j].endswith("/") for j in range(heads[0] + 1, i))
                                       for i in rows), name
    row = next(line for line in lines if line.startswith("  sft.yaml"))
    assert row.split(None, 1)[1] == "Plain SFT: next-item cross-entropy at every position"


def test_copy_writes_the_shipped_file_and_never_over_one_without_force(tmp_path):
    target = copy_config("method/exp_sft.yaml", str(tmp_path))
    assert target == tmp_path / "exp_sft.yaml" and target.read_bytes() == shipped("method/exp_sft.yaml").read_bytes()
    target.write_text("edited\n")
    with pytest.raises(RecpostError, match=f"{target} exists; pass --force"):
        copy_config("method/exp_sft.yaml", str(tmp_path))
    assert target.read_text() == "edited\n"
    assert copy_config("method/exp_sft", str(target), force=True).read_bytes() == shipped("method/exp_sft.yaml").read_bytes()
    assert copy_config("configs/data/sim.yaml", str(tmp_path / "new" / "world.yaml")).is_file()
    with pytest.raises(RecpostError, match="no shipped config data/nope.yaml"):
        copy_config("data/nope.yaml", str(tmp_path))


def test_a_copied_experiment_config_finds_the_shipped_configs_it_names(tmp_path, monkeypatch):
    from recpost.experiment import load_study

    monkeypatch.chdir(tmp_path)
    copy = copy_config("experiments/sim.yaml", str(tmp_path / "studies" / "mine.yaml"))
    mine = tmp_path / "studies" / "sft_mine.yaml"  # a reference next to the copy wins over the shipped one
    mine.write_text(shipped("method/sft.yaml").read_text())
    raw = yaml.safe_load(copy.read_text())
    raw["methods"]["sft"]["config"] = "sft_mine.yaml"
    copy.write_text(yaml.safe_dump(raw))
    study = load_study("studies/mine.yaml")
    assert study.path == copy and study.pretrain_config == shipped("pretrain/sim.yaml")
    assert next(m for m in study.methods if m.name == "sft").config == mine
    assert next(m for m in study.methods if m.name == "exp_sft").config == shipped("method/exp_sft.yaml")


def test_a_data_root_under_recpost_data_dir_follows_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("RECPOST_DATA_DIR", str(tmp_path))
    assert _resolve_root("$RECPOST_DATA_DIR/ml-1m-users1-2999") == tmp_path / "ml-1m-users1-2999"
    assert _resolve_root("${RECPOST_DATA_DIR}/a/b") == tmp_path / "a" / "b"
    assert _resolve_root("$RECPOST_DATA_DIR") == tmp_path and _resolve_root(None) == tmp_path
    assert _resolve_root("data/$RECPOST_DATA_DIR") == Path("data/$RECPOST_DATA_DIR")  # only as the first part
    monkeypatch.delenv("RECPOST_DATA_DIR")
    assert _resolve_root("$RECPOST_DATA_DIR/x") == Path.home() / ".cache" / "recpost" / "data" / "x"


def test_missing_data_names_the_path_and_the_unset_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("RECPOST_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(RecpostError) as info:
        MovieLens("1m", root="$RECPOST_DATA_DIR/ml-1m-users1-2999", download=False).load()
    message = str(info.value)
    expected = tmp_path / ".cache" / "recpost" / "data" / "ml-1m-users1-2999" / "ml-1m" / "ratings.dat"
    assert f"expected {expected}" in message and "RECPOST_DATA_DIR is not set" in message and "\n" not in message


def test_the_ml1m_subset_config_reads_its_folder_inside_the_data_dir():
    source = yaml.safe_load(shipped("data/ml1m_users1_2999.yaml").read_text())["data"]["source"]["init_args"]
    assert source["root"] == "$RECPOST_DATA_DIR/ml-1m-users1-2999" and source["download"] is False


def test_no_shipped_config_points_at_a_path_of_this_checkout():
    # A relative path that leaves the configs (../shared/data/...) holds only in this project's checkout.
    for name in shipped_names():
        text = (shipped_dir() / name).read_text()
        uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        assert "shared/" not in uncommented, name


@pytest.mark.slow
def test_commands_name_shipped_configs_and_list_and_copy_them(tmp_path):
    from recpost import __version__
    from tests.helpers import recpost_cases

    (tmp_path / "mine.yaml").write_text("x: 1\n")
    done = recpost_cases({
        "version": (["--version"], {}),
        "list": (["configs"], {}),
        "copy": (["configs", "cp", "experiments/sim", str(tmp_path / "copies") + "/"], {}),
        "no overwrite": (["configs", "cp", "method/sft.yaml", "mine.yaml"], {}),
        "print config": (["fit", "--config", "pretrain/sim", "--print_config"], {}),
        "unknown": (["fit", "--config", "experiments/nope"], {}),
    }, cwd=tmp_path)
    assert done["version"].returncode == 0 and done["version"].stdout == f"recpost {__version__}\n"
    assert done["list"].returncode == 0 and "\nexperiments/\n" in done["list"].stdout
    assert done["copy"].returncode == 0 and (tmp_path / "copies" / "sim.yaml").is_file()
    assert done["no overwrite"].returncode == 2 and (tmp_path / "mine.yaml").read_text() == "x: 1\n"
    assert done["no overwrite"].stderr.strip() == "error: mine.yaml exists; pass --force to overwrite it, or give another DEST"
    assert done["print config"].returncode == 0, done["print config"].stderr[-2000:]
    assert "class_path: recpost.data.Simulator" in done["print config"].stdout
    assert done["unknown"].returncode == 2
    assert done["unknown"].stderr.startswith("error: config file not found: experiments/nope (looked in")
