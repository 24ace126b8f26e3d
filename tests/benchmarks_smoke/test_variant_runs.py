"""benchmarks/variant_runs.py: the copy of a finished run that a change runs on, the stages' order,
the stale-output guard and the flow command (the flows themselves are tested elsewhere)."""

from __future__ import annotations

import json

import pytest

from benchmarks.variant_runs import flow_command, pipeline_order, prepare_copy, stale_readers


def fake_run(root):
    files = {"splits/train.parquet": "s", "items.parquet": "i", "tokenizer/tokenizer.json": "t",
             "sasrec/model.safetensors": "m", "backbone/model.safetensors": "b", "backbone/ckpt/last/x": "c",
             "eval/leaderboard.json": "e"}
    for rel, text in files.items():
        (root / "data" / "ds" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / "ds" / rel).write_text(text)
    (root / "reports" / "ds").mkdir(parents=True)
    (root / "reports" / "ds" / "backbone.json").write_text("{}")
    return root


def test_the_copy_links_what_the_stages_read_and_leaves_out_what_they_write(tmp_path):
    base = fake_run(tmp_path / "base")
    copy = tmp_path / "out" / "base"
    settings = {"seed": 1, "stages": ["backbone", "evaluate"], "overrides": ["a=1"]}
    prepare_copy(base, copy, "ds", ["backbone", "evaluate"], settings)
    data = copy / "data" / "ds"
    assert not (data / "backbone").exists() and not (data / "eval").exists()
    for rel in ("splits/train.parquet", "items.parquet", "tokenizer/tokenizer.json", "sasrec/model.safetensors"):
        assert (data / rel).stat().st_ino == (base / "data" / "ds" / rel).stat().st_ino  # a hard link
    report = copy / "reports" / "ds" / "backbone.json"
    assert report.read_text() == "{}" and report.stat().st_ino != (base / "reports" / "ds" / "backbone.json").stat().st_ino
    assert json.loads((copy / "variant.json").read_text()) == settings
    prepare_copy(base, copy, "ds", ["backbone", "evaluate"], settings)  # the same settings: resumed as it is
    with pytest.raises(ValueError, match="exists with other settings"):
        prepare_copy(base, copy, "ds", ["backbone", "evaluate"], {**settings, "overrides": ["a=2"]})


def test_a_stage_left_out_whose_outputs_would_go_stale_is_refused_by_name(tmp_path):
    base = fake_run(tmp_path / "base")
    (base / "data" / "ds" / "mine").mkdir()
    (base / "data" / "ds" / "mine" / "train.parquet").write_text("m")
    assert stale_readers(base / "data" / "ds", ["backbone"]) == [
        "mine (reads backbone/model.safetensors, which backbone writes again)",
        "evaluate (reads backbone/model.safetensors, which backbone writes again)"]
    assert stale_readers(base / "data" / "ds", ["evaluate"]) == []
    with pytest.raises(ValueError, match=r"mine \(reads backbone/model.safetensors"):
        prepare_copy(base, tmp_path / "out" / "base", "ds", ["backbone", "evaluate"], {})
    assert not (tmp_path / "out" / "base").exists()


def test_stages_run_in_the_pipelines_order_with_the_seed_and_the_copys_places(tmp_path):
    assert pipeline_order(["evaluate", "backbone", "tokenize", "sasrec"]) == ["sasrec", "tokenize", "backbone", "evaluate"]
    with pytest.raises(ValueError, match="unknown stages"):
        pipeline_order(["backbone", "nope"])
    cmd = flow_command("backbone", tmp_path / "c", 7, ["backbone.model.encoder_layers=2"])
    assert cmd[1:3] == ["-m", "flows.backbone"]
    assert cmd[3:] == ["-S", "sasrec.seed=7", "-S", "backbone.train.seed=7", "-S", f"data.data_dir={tmp_path / 'c' / 'data'}",
                       "-S", f"data.reports_dir={tmp_path / 'c' / 'reports'}", "-S", "backbone.model.encoder_layers=2"]
