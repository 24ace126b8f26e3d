from benchmarks.cf_ids import default_kind, kind_settings
from benchmarks.common import copy_run
from tasks.params import load_params


def test_copy_run_keeps_what_dst_built_and_gains_what_src_made_since(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "splits").mkdir(parents=True)
    (src / "splits" / "train.parquet").write_text("base")
    (src / "backbone").mkdir()
    (src / "backbone" / "model").write_text("base model")
    copy_run(src, dst, skip={"backbone"})
    assert (dst / "splits" / "train.parquet").read_text() == "base" and not (dst / "backbone").exists()
    (dst / "splits" / "train.parquet").write_text("kept")  # what the benchmark has there stays
    (src / "sasrec").mkdir()
    (src / "sasrec" / "model").write_text("trained later")
    copy_run(src, dst, skip={"backbone"})
    assert (dst / "splits" / "train.parquet").read_text() == "kept"
    assert (dst / "sasrec" / "model").read_text() == "trained later" and not (dst / "backbone").exists()


def test_kinds_of_id():
    assert kind_settings("prebuilt") == ["tokenize.source=prebuilt"]
    assert kind_settings("cf") == ["tokenize.source=train", "tokenize.embedding=cf"]
    assert default_kind(load_params(overrides=["data.dataset=ml-100k"])) == load_params().tokenize.embedding
    assert default_kind(load_params(overrides=["data.dataset=instruments"])) == "prebuilt"  # its own index


def test_stage_ranks_are_checked_and_copied_beside_a_benchmarks(tmp_path):
    import numpy as np
    import pytest
    from benchmarks.common import check_stage_ranks, copy_stage_ranks
    from tasks.evaluate import ranks_dir, save_ranks
    users, ranks = np.array([3, 1, 2]), np.array([0, 5, 1])
    save_ranks(tmp_path, "tiger_cf", users, ranks, "valid")
    assert (ranks_dir(tmp_path, "valid") / "tiger_cf.parquet").is_file()
    assert ranks_dir(tmp_path, "test", "eval_x") == tmp_path / "eval_x"
    check_stage_ranks(tmp_path, "valid", "tiger_cf", users[::-1], ranks[::-1], "x")  # order does not matter
    with pytest.raises(ValueError, match="tiger_cf.parquet: tiger_cf's ranks recomputed here differ.*breaks it"):
        check_stage_ranks(tmp_path, "valid", "tiger_cf", users, np.array([0, 5, 2]), "breaks it")
    with pytest.raises(ValueError, match="differ"):  # another set of users
        check_stage_ranks(tmp_path, "valid", "tiger_cf", users[:2], ranks[:2], "x")
    save_ranks(tmp_path, "mine", users, ranks, "valid", root="eval_x")
    copy_stage_ranks(tmp_path, "valid", "eval_x", ("tiger_cf", "sasrec"))  # sasrec: not written, skipped
    assert sorted(p.name for p in ranks_dir(tmp_path, "valid", "eval_x").iterdir()) == ["mine.parquet", "tiger_cf.parquet"]
