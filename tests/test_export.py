"""Export and serving: ``recpost export`` writes a folder that recommends exactly as the trained module ranks,
without recpost; ``recpost recommend`` reads the formats users have and reports unknown items instead of failing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import recpost
from recpost.models.checkpoint import save_checkpoint
from recpost.core.errors import RecpostError
from recpost.serving.export import CatalogScorer, export, export_scorer
from recpost.methods import SFT, RewardModel
from recpost.models import BackboneConfig, build_backbone
from recpost.serving.pretrained import ModelFolder, load_pretrained
from recpost.serving.serve import read_histories, recommend
from tests.helpers import build, recpost as run_recpost, tiny_datamodule

K = 10


def data_config(folder: Path, dm) -> Path:
    """The data section of a fit config that rebuilds ``dm`` (same file, options and cache)."""
    path = folder / "data.yaml"
    path.write_text(textwrap.dedent(f"""\
        data:
          source:
            class_path: recpost.data.Table
            init_args: {{path: {dm.source.path}, name: tiny}}
          max_len: {dm.max_len}
          cache_dir: {dm.cache_dir}
        model:
          class_path: recpost.methods.SFT
        """))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A seeded SFT module on the tiny data, its checkpoint, data config and exported folder."""
    tmp = tmp_path_factory.mktemp("export")
    dm = tiny_datamodule(tmp)
    module = build(SFT, dm).eval()
    ckpt = save_checkpoint(module, tmp / "sft.ckpt")
    config = data_config(tmp, dm)
    export(str(ckpt), str(tmp / "model"), config=[str(config)])
    return dm, module, ckpt, config, tmp / "model"


def source_histories(dm, users: list[int]) -> list[list[str]]:
    """Each user's test history (every item before the test target) in the source's ids, oldest first."""
    history = dm.eval_batch(users, "test")["history_items"]
    return [dm.original_item_ids(row[row > 0].numpy()) for row in history]


def test_the_folder_holds_safetensors_weights_json_config_item_map_and_scorer(exported):
    dm, module, _, _, out = exported
    folder = ModelFolder(out)
    config = json.loads(folder.config.read_text())
    assert config["n_items"] == dm.n_items and config["max_len"] == dm.max_len
    assert config["item_map_hash"] == dm.item_map_hash
    assert config["method"] in ("recpost.methods.SFT", "recpost.methods.sft.SFT")
    assert config["recpost_version"] == recpost.__version__ and config["scorer"]["inputs"] == ["items"]
    item_map = json.loads(folder.item_map.read_text())
    assert item_map == {str(i): dm.original_item_ids([i])[0] for i in range(1, dm.n_items + 1)}
    weights = load_file(folder.weights)
    assert weights.keys() == module.backbone.state_dict().keys()


def test_the_folder_has_a_usage_note_and_names_its_checkpoint_without_a_path(exported):
    _, module, ckpt, _, out = exported
    folder = ModelFolder(out)
    config = json.loads(folder.config.read_text())
    assert config["checkpoint"] == {"name": "sft.ckpt", "weights_sha256": torch.load(ckpt, weights_only=True)["recpost"][
        "weights_sha256"]}
    assert str(ckpt.parent) not in folder.config.read_text()
    note = folder.readme.read_text()
    assert "recpost recommend --model <this folder>" in note and "load_pretrained" in note and "torch.export.load" in note


def test_exported_top_k_equals_the_modules_ranking_with_the_history_masked(exported):
    dm, module, _, _, out = exported
    users = list(range(dm.data.n_users))
    with torch.no_grad():
        expected = torch.topk(module.catalog_scores(dm.eval_batch(users, "test")), K, dim=1)
    recs = load_pretrained(out).recommend(source_histories(dm, users), k=K, batch_size=len(users))
    for row, rec in enumerate(recs):
        assert rec.items == dm.original_item_ids(expected.indices[row].numpy())
        assert rec.scores == pytest.approx(expected.values[row].tolist(), rel=1e-5)
        assert rec.unknown_items == []


def test_a_round_trip_through_the_folder_preserves_scores_exactly(exported):
    dm, module, _, _, out = exported
    loaded = load_pretrained(out)
    items = dm.eval_batch(list(range(40)), "test")["input_items"]  # [40, max_len], left-padded
    with torch.no_grad():
        expected = CatalogScorer(module.backbone, ("items",))(items)
        rebuilt = CatalogScorer(loaded.backbone(), ("items",))(items)
    assert torch.equal(loaded.scores(items), expected)
    assert torch.equal(rebuilt, expected)


def test_the_scorer_runs_in_a_python_that_cannot_import_recpost(exported, tmp_path):
    dm, _, _, _, out = exported
    shutil.copytree(out, tmp_path / "model")
    items = dm.eval_batch(list(range(7)), "val")["input_items"]
    torch.save(items, tmp_path / "items.pt")
    script = textwrap.dedent("""\
        import sys
        sys.modules["recpost"] = None  # any import of recpost, or of a module of it, now fails
        import torch
        torch.set_num_threads(1)  # as in the tests' process: the same reduction order, the same bits
        try:
            import recpost.serving.pretrained
        except ImportError:
            pass
        else:
            raise SystemExit("recpost is importable")
        scorer = torch.export.load("model/scorer.pt2").module()
        with torch.no_grad():
            torch.save(scorer(torch.load("items.pt")), "scores.pt")
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "scores.pt"), load_pretrained(out).scores(items))


def test_the_scorer_takes_the_ratings_when_the_backbone_reads_them(exported):
    assert json.loads(ModelFolder(exported[-1]).config.read_text())["scorer"]["inputs"] == ["items"]  # SASRec's default
    config = BackboneConfig(d_model=16, n_layers=1, n_heads=2, use_ratings=True)
    backbone = build_backbone(config, n_items=30, max_len=6).eval()
    program, inputs = export_scorer(backbone, max_len=6)
    assert inputs == ("items", "ratings")
    history = {"items": torch.tensor([[0, 3, 7, 9]]), "ratings": torch.tensor([[0.0, 4.5, 1.0, 3.0]])}
    with torch.no_grad():
        assert torch.equal(program.module()(*(history[n] for n in inputs)), CatalogScorer(backbone, inputs)(*(history[n] for n in inputs)))


def test_unknown_items_are_reported_per_user_and_left_out_of_the_history(exported):
    dm, _, _, _, out = exported
    loaded = load_pretrained(out)
    history = source_histories(dm, [0])[0]
    with_unknown = ["new-item", *history[:2], 12345, *history[2:], "new-item"]
    plain, noisy, none_known = loaded.recommend([history, with_unknown, ["new-item", "other"]], k=K)
    assert noisy.unknown_items == ["new-item", 12345]
    assert noisy.items == plain.items and noisy.scores == plain.scores
    assert (none_known.items, none_known.unknown_items) == ([], ["new-item", "other"])


def test_recommendations_leave_out_the_history_and_stop_at_the_catalog(exported):
    dm, _, _, _, out = exported
    history = source_histories(dm, [3])[0]
    (rec,) = load_pretrained(out).recommend([history], k=10_000)
    assert len(rec.items) == dm.n_items - len(history)
    assert not set(rec.items) & set(history)
    assert rec.scores == sorted(rec.scores, reverse=True)


def test_timestamps_put_a_history_in_time_order(exported):
    dm, _, _, _, out = exported
    history = source_histories(dm, [5])[0]
    shuffled = list(reversed(range(len(history))))
    given = {"user_id": "u", "items": [history[i] for i in shuffled], "timestamps": [100 + i for i in shuffled]}
    in_order, from_timestamps = load_pretrained(out).recommend([history, given], k=K)
    assert from_timestamps.user_id == "u" and from_timestamps.items == in_order.items


def test_export_refuses_a_reward_model_a_foreign_catalog_and_an_occupied_folder(exported, tmp_path):
    dm, _, ckpt, config, out = exported
    rm = save_checkpoint(build(RewardModel, dm), tmp_path / "rm.ckpt")
    with pytest.raises(RecpostError, match="is a reward model"):
        export(str(rm), str(tmp_path / "rm-model"), config=[str(config)])
    other = tiny_datamodule(tmp_path / "other", n_items=30)
    with pytest.raises(RecpostError, match="another item catalog"):
        export(str(ckpt), str(tmp_path / "x"), config=[str(data_config(tmp_path / "other", other))])
    with pytest.raises(RecpostError, match="already exists; .* --overwrite"):
        export(str(ckpt), str(out), config=[str(config)])
    with pytest.raises(RecpostError, match="not inside a run folder .* --config"):
        export(str(ckpt), str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bad_histories_get_one_line_errors(tmp_path):
    cases = {
        "bad.jsonl": ('{"user_id": "u1", "items": [1, 2]}\n{"user_id": "u2", "items": [1,\n', "bad.jsonl line 2: not JSON"),
        "noitems.jsonl": ('{"user_id": "u1"}\n', "needs 'user_id' and 'items'"),
        "ratings.jsonl": ('{"user_id": "u1", "items": [1, 2], "ratings": [4]}\n', "'ratings' must be a list as long as 'items'"),
        "cols.csv": ("user,item\nu1,1\n", r"missing \['user_id', 'item_id'\]"),
        "ts.csv": ("user_id,item_id,timestamp\nu1,1,yesterday\n", "timestamp 'yesterday' in row 1 is neither a number "
                   "nor an ISO date"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(RecpostError, match=message) as info:
            read_histories(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(RecpostError, match="not an exported recpost model"):
        recommend(str(tmp_path), str(tmp_path / "cols.csv"))


def test_a_long_csv_groups_rows_by_user_in_file_order(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp,rating\nu2,7,5,4.5\nu1,0042,1,3\nu2,8,6,2\n")
    u2, u1 = read_histories(path)
    assert (u2.user_id, u2.items, u2.timestamps, u2.ratings) == ("u2", ["7", "8"], [5, 6], [4.5, 2.0])
    assert (u1.user_id, u1.items) == ("u1", ["0042"])


def test_import_recpost_stays_light_and_load_pretrained_is_exported():
    code = "import sys, recpost; assert 'torch' not in sys.modules, 'torch'; assert callable(recpost.load_pretrained)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_cli_export_then_recommend_jsonl_and_csv(exported, tmp_path):
    dm, _, ckpt, config, _ = exported
    out = tmp_path / "model"
    proc = run_recpost("export", "--ckpt_path", str(ckpt), "--out", str(out), "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-2000:]
    histories = tmp_path / "histories.jsonl"
    history = source_histories(dm, [0])[0]
    histories.write_text(json.dumps({"user_id": "new", "items": [*history, "nope"]}) + "\n")
    proc = run_recpost("recommend", "--model", str(out), "--histories", str(histories), "--k", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = load_pretrained(out).recommend([history], k=3)[0]
    assert row["user_id"] == "new" and row["items"] == expected.items and row["unknown_items"] == ["nope"]
    assert "users/s" in proc.stderr
    csv_out = tmp_path / "recs.csv"
    proc = run_recpost("recommend", "--model", str(out), "--histories", str(histories), "--format", "csv", "--out", str(csv_out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "user_id,rank,item_id,score" and len(lines) == 11
    assert "user new: unknown items left out of the history: nope" in proc.stderr
