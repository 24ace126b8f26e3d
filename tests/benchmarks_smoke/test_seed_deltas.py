"""benchmarks/seed_deltas.py: seeds from seeds_table JSONs and from an earlier record, tested over seeds."""

from __future__ import annotations

import pytest
from scipy import stats

from benchmarks import seed_deltas
from tasks import io


def table(path, pairs):
    io.write_json(path, {"per_seed_vs_against": {"m": [
        {"dir": d, "against": d + "_base", "recall@10": c, "recall@10_against": b, "recall@10_diff": c - b,
         "ndcg@10": 0.0, "ndcg@10_against": 0.0, "ndcg@10_diff": 0.0} for d, c, b in pairs]}})
    return path


def test_seeds_from_tables_and_records_are_tested_over_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr("benchmarks.common.RESULTS", tmp_path)
    t = table(tmp_path / "t.json", [("s1", 0.5, 0.0), ("s2", 0.25, 0.5)])
    out = seed_deltas.main(["--name", "x", "--method", "m", "--json", str(t), "--record", "s3", "0.3", "0.2",
                            "--record-source", "an earlier table"])
    assert [r["diff"] for r in out["per_seed"]] == pytest.approx([0.5, -0.25, 0.1])
    assert [r["source"] for r in out["per_seed"]] == [str(t), str(t), "an earlier table"]
    assert out["mean_diff"] == pytest.approx(0.35 / 3) and out["positive"] == 2
    assert out["t_test_p"] == pytest.approx(stats.ttest_1samp([0.5, -0.25, 0.1], 0.0).pvalue)
    assert io.read_json(tmp_path / "seed_deltas_x.json")["seeds"] == 3


def test_a_table_without_the_per_seed_pairs_or_a_record_without_its_source_is_refused(tmp_path):
    io.write_json(tmp_path / "old.json", {"vs_against": {}})
    with pytest.raises(ValueError, match=r"old.json: field per_seed_vs_against has no method 'm'"):
        seed_deltas.main(["--name", "x", "--method", "m", "--json", str(tmp_path / "old.json")])
    with pytest.raises(SystemExit, match="--record-source"):
        seed_deltas.main(["--name", "x", "--method", "m", "--record", "s", "0.1", "0.2"])
