"""The scale benchmark's pieces (recpost.bench.shipped, scale_stages, scale) on a tiny synthetic shape: the shipped
settings it reads, one stage of each kind run in this process, the projections' arithmetic, and a failing stage
recorded instead of ending the run. The figures at the real shapes are in docs/scale/costs.md."""

from __future__ import annotations

import dataclasses

import pytest

from recpost.bench.scale import GPU_PEAK_FLOPS, GPU_UTILISATION, _run_stage, project, stage_methods
from recpost.bench.shipped import shipped_study
from recpost.bench.synthetic import PRESETS, generate


def test_the_books_study_scores_in_chunks_and_the_ml20m_study_does_not():
    books, ml20m = shipped_study("books"), shipped_study("ml20m")
    assert books.pretrain.init_args["backbone"]["name"] == "sasrec"  # configs/pretrain/amazon_books.yaml
    assert books.methods["base"].init_args["backbone"]["name"] == "hstu"  # the paper study's backbone: hstu
    for name in ("sft", "asft", "ppo", "dpo", "rs_dpo", "reward_model"):
        assert books.methods[name].init_args["score_chunk_size"] == 65536, name  # posttrain_overrides
        assert "score_chunk_size" not in ml20m.methods[name].init_args or ml20m.methods[name].init_args["score_chunk_size"] is None
    assert books.methods["rs_dpo"].reward_ensemble == 3 and books.judges == 3 and books.eval_min_rating == 4.5
    assert books.methods["ppo"].init_args["kl_estimator"] != "exact"  # the study's override for the chunked catalog


def test_every_method_config_is_measured_beside_the_study():
    names = stage_methods("ml20m", None)
    assert names[:2] == ["pretrain", "base"]
    assert {"sft", "exp_sft", "linear_sft", "asft", "reward_model", "ppo", "dpo", "online_dpo", "rs_dpo"} <= set(names)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    shape = dataclasses.replace(PRESETS["ml20m"], n_users=120, n_items=150, n_interactions=3_000, min_per_user=5)
    generate(shape, root)
    return root


@pytest.mark.parametrize("method", ["sft", "ppo"])
def test_a_step_stage_times_the_shipped_method_and_counts_its_flops(tiny_root, monkeypatch, method):
    from recpost.bench.scale_stages import STAGES

    monkeypatch.setenv("RECPOST_DATA_DIR", str(tiny_root))
    job = {"shape": "ml20m", "cache_dir": str(tiny_root / "cache"), "device": "cpu", "steps": 1, "method": method}
    figures = STAGES["step"](job)
    assert figures["step_seconds"] > 0 and figures["step_flops"] > 0 and figures["peak_mib"] >= figures["setup_mib"] > 0
    assert figures["targets_per_step"] > 0 and figures["batch_size"] == 128  # configs/pretrain/ml20m.yaml


def test_an_eval_stage_gives_users_per_second_over_the_studys_users(tiny_root, monkeypatch):
    from recpost.bench.scale_stages import STAGES

    monkeypatch.setenv("RECPOST_DATA_DIR", str(tiny_root))
    job = {"shape": "ml20m", "cache_dir": str(tiny_root / "cache"), "device": "cpu", "eval_users": 40, "method": "sft"}
    figures = STAGES["eval"](job)
    assert 0 < figures["eval_users"] <= 40 and figures["val_users"] < figures["all_users"] == 120  # eval_min_rating 4.5
    assert figures["users_per_second"] == pytest.approx(figures["eval_users"] / figures["eval_seconds"])


def test_projections_are_batches_times_step_and_users_over_rate():
    figures = {"step/sft/step_seconds": 2.0, "step/sft/batch_seconds": 0.5, "step/sft/windows": 1001.0,
               "step/sft/batch_size": 100.0, "step/sft/step_flops": 1e12, "eval/sft/users_per_second": 50.0,
               "eval/sft/val_users": 1000.0, "eval/sft/all_users": 4000.0}
    out = project(figures, {})
    assert out["projected/epoch_seconds/sft"] == 11 * 2.5
    assert out["projected/gpu_epoch_seconds/sft"] == pytest.approx(11 * 1e12 / (GPU_PEAK_FLOPS * GPU_UTILISATION))
    assert out["projected/validation_seconds/sft"] == 20.0 and out["projected/validation_all_users_seconds/sft"] == 80.0


def test_a_stage_out_of_memory_is_recorded_not_raised(tmp_path):
    figures, error = _run_stage({"stage": "preprocess", "shape": "ml20m", "cache_dir": str(tmp_path)}, tmp_path, 0.05)
    assert figures == {} and error  # 50 MiB of address space: the process cannot even start torch


def test_the_figures_file_keeps_every_finished_stage_when_a_run_is_stopped(tmp_path, monkeypatch):
    import json

    from recpost.bench import scale

    def fake_stage(job, data_root, limit):  # preprocess and sft measured, then the run is stopped (Ctrl-C, a kill)
        if job.get("method") == "ppo":
            raise KeyboardInterrupt
        return {"seconds": 1.0 if job["stage"] == "preprocess" else 2.0}, None

    monkeypatch.setattr(scale, "_run_stage", fake_stage)
    monkeypatch.setattr(scale, "generate", lambda shape, root: {"path": str(root)})
    out = tmp_path / "figures.json"
    with pytest.raises(KeyboardInterrupt):
        scale.scale_bench("ml20m", tmp_path, methods=["sft", "ppo"], output=str(out))
    saved = json.loads(out.read_text())
    assert saved["figures"]["preprocess/seconds"] == 1.0 and saved["figures"]["step/sft/seconds"] == 2.0
    assert not any(k.startswith("step/ppo") for k in saved["figures"]) and saved["errors"] == {}
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]  # written whole: no temporary file left
