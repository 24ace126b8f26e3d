"""benchmarks.champion_summary reads each method's paired difference to SASRec from the two kinds of
JSON, refuses to combine different runs, and draws them."""

from __future__ import annotations

import pytest

from benchmarks.champion_summary import combine, markdown, plot, read_run


def paired(diff: float) -> dict:
    return {"recall@10": {"diff": diff, "ci_low": diff - 0.01, "ci_high": diff + 0.01, "p_value": 0.04}}


def seeds_table(sasrec: float = 0.2, users: int = 100) -> dict:
    methods = {"sasrec": {"metrics": {"recall@10": sasrec}},
               "tiger": {"metrics": {"recall@10": sasrec - 0.03}, "vs_sasrec": paired(-0.03)},
               "grc_sft": {"metrics": {"recall@10": sasrec + 0.01}, "vs_sasrec": paired(0.01)}}
    return {"dirs": ["d"], "seeds": {"d": {"users": users, "methods": methods}}}


def cf_fusion(sasrec: float = 0.2, users: int = 100, late: str = "rrf") -> dict:
    test = {"users": users, "metrics": {"sasrec": {"recall@10": sasrec}},
            "paired": {"tiger": {"vs_sasrec": paired(-0.03)}, "tiger_cf": {"vs_sasrec": paired(0.012)},
                       "rrf": {"vs_sasrec": paired(0.001)}, "linear": {"vs_sasrec": paired(0.004)},
                       "sasrec": {"vs_linear": paired(-0.004)}}}
    return {"test": test, "valid": {"chosen": {"late_fusion": late}}}


def test_the_validation_chosen_late_fusion_is_the_one_shown():
    users, sasrec, p = read_run(cf_fusion(late="linear"), "x")
    assert (users, sasrec) == (100, 0.2)
    assert set(p) == {"tiger", "tiger_cf", "late_fusion"}
    assert p["late_fusion"]["diff"] == pytest.approx(0.004)
    assert read_run(cf_fusion(late="rrf"), "x")[2]["late_fusion"]["diff"] == pytest.approx(0.001)


def test_a_run_combines_its_jsons_in_percent_of_sasrec():
    row = combine("run", {"a": seeds_table(), "b": cf_fusion()})
    assert set(row["methods"]) == {"tiger", "late_fusion", "tiger_cf", "grc_sft"}
    assert row["methods"]["tiger"]["diff_pct"] == pytest.approx(-15.0)
    assert row["methods"]["grc_sft"]["diff_pct"] == pytest.approx(5.0)
    assert row["methods"]["tiger_cf"]["ci_low_pct"] == pytest.approx(1.0)
    assert "+5.0% [+0.0, +10.0], p 0.040" in markdown([row])


def other_tiger() -> dict:
    doc = cf_fusion()
    doc["test"]["paired"]["tiger"]["vs_sasrec"] = paired(-0.021)
    return doc


@pytest.mark.parametrize("other", [cf_fusion(sasrec=0.21), cf_fusion(users=101), other_tiger()])
def test_jsons_of_different_runs_are_refused(other):
    doc = seeds_table()
    combine("run", {"a": doc, "b": cf_fusion()})  # the same users, SASRec and TIGER
    with pytest.raises(ValueError, match="not the same run"):
        combine("run", {"a": doc, "b": other})


def test_several_seeds_are_read_by_their_seed_averaged_tests():
    doc = {"dirs": ["a", "b"], "seeds": {"a": {"users": 100}, "b": {"users": 100}},
           "mean_std": {"sasrec": {"recall@10": {"mean": 0.25, "std": 0.01}}},
           "seed_averaged_vs_sasrec": {"tiger_cf": paired(0.02)}}
    users, sasrec, p = read_run(doc, "x")
    assert (users, sasrec, p["tiger_cf"]["diff"]) == (100, 0.25, 0.02)
    assert combine("seeds", {"x": doc})["methods"]["tiger_cf"]["diff_pct"] == pytest.approx(8.0)
    del doc["seed_averaged_vs_sasrec"]
    with pytest.raises(ValueError, match="seed_averaged"):
        read_run(doc, "x")


def test_a_beam_width_json_gives_its_widest_beam():
    def row(cf: float, late: float) -> dict:
        return {"test_users": 100, "test": {"sasrec": {"recall@10": 0.2}},
                "paired_recall@10": {"tiger_cf_vs_sasrec": paired(cf)["recall@10"],
                                     "late_fusion_vs_sasrec": paired(late)["recall@10"]}}
    doc = {"by_beam": {"20": row(0.05, 0.03), "200": row(0.012, 0.001)}}
    users, sasrec, p = read_run(doc, "x")
    assert (users, sasrec, set(p)) == (100, 0.2, {"tiger_cf", "late_fusion"})
    assert p["tiger_cf"]["diff"] == pytest.approx(0.012)  # 200, not 20 (the keys compare as numbers)
    assert p["late_fusion"]["diff"] == pytest.approx(0.001)
    combine("run", {"a": cf_fusion(), "b": doc})  # the same SASRec, users, tiger_cf and late fusion: one run
    doc["by_beam"]["200"] = row(0.012, 0.002)
    with pytest.raises(ValueError, match="not the same run"):
        combine("run", {"a": cf_fusion(), "b": doc})


def test_an_unknown_json_is_refused():
    with pytest.raises(ValueError, match="not a benchmarks"):
        read_run({"x": 1}, "odd.json")


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "p.png"
    plot([combine("a", {"a": seeds_table()}), combine("b", {"b": cf_fusion()})], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
