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
