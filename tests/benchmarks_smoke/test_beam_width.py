"""benchmarks.beam_width pairs each method's per-user metric averaged over the runs, matching users by
id whatever their order, and refuses runs of different users."""

from __future__ import annotations

import pytest

from benchmarks.beam_width import METHODS, plot, report_of


def run(beam: int, users: list[int], ranks: dict[str, list[int]], cf: float = 4.0) -> dict:
    full = {m: ranks.get(m, [0] * len(users)) for m in METHODS}
    valid = {"tiger": 0.1, f"tiger_cf@{cf}": 0.2, f"linear@{cf}": 0.2, "rrf": 0.15}
    return {"beam": beam, "user_ids": users, "ranks": full, "test_users": len(users),
            "chosen": {"tiger_cf": cf, "linear": cf, "late_fusion": "linear"},
            "valid": {"users": len(users), "recall@10": valid},
            "users_per_s": {"tiger": 1000.0 / beam, "tiger_cf": 900.0 / beam}}


def test_runs_are_matched_by_user_and_averaged():
    # run a: users 1, 2 in order; run b: the same users listed 2, 1. tiger_cf hits user 1 in a
    # (rank 3) and user 2 in b (rank 12 > 10: a miss), so per user R@10 is (0.5, 0) averaged.
    a = run(10, [1, 2], {"tiger_cf": [3, 0], "late_fusion": [0, 0], "sasrec": [1, 1]})
    b = run(10, [2, 1], {"tiger_cf": [12, 0], "late_fusion": [0, 5], "sasrec": [1, 1]})
    wide = run(20, [1, 2], {"tiger_cf": [1, 1]})
    rows = report_of({10: [a, b], 20: [wide, run(20, [2, 1], {"tiger_cf": [1, 1]})]}, n_boot=200)
    row = rows[10]
    assert row["test"]["tiger_cf"]["recall@10"] == pytest.approx(0.25)
    assert row["test"]["late_fusion"]["recall@10"] == pytest.approx(0.25)  # user 1 hit in b only
    assert row["test"]["sasrec"]["recall@10"] == pytest.approx(1.0)
    assert row["paired_recall@10"]["tiger_cf_vs_late_fusion"]["diff"] == pytest.approx(0.0)
    assert row["paired_recall@10"]["tiger_cf_vs_sasrec"]["diff"] == pytest.approx(-0.75)
    assert row["paired_recall@10"]["tiger_cf_vs_tiger_cf_widest"]["diff"] == pytest.approx(-0.75)
    assert rows[20]["paired_recall@10"]["tiger_cf_vs_tiger_cf_widest"]["diff"] == pytest.approx(0.0)
    assert row["users_per_s"]["tiger"] == pytest.approx(100.0)
    assert row["valid_recall@10_mean"]["tiger_cf"] == pytest.approx(0.2)
    assert "recall@50" not in row["test"]["tiger"]  # deeper cut-offs only where the beam reaches them


def test_deeper_recall_where_the_beam_reaches_it():
    rows = report_of({50: [run(50, [1, 2], {"tiger": [30, 60]})]}, n_boot=10)
    assert rows[50]["test"]["tiger"]["recall@50"] == pytest.approx(0.5)
    assert rows[50]["test"]["tiger"]["recall@10"] == pytest.approx(0.0)
    assert "recall@100" not in rows[50]["test"]["tiger"]


def test_runs_of_different_users_are_refused():
    with pytest.raises(ValueError, match="different users"):
        report_of({10: [run(10, [1, 2], {}), run(10, [1, 3], {})]}, n_boot=10)


def test_the_plot_is_written(tmp_path):
    rows = report_of({10: [run(10, [1, 2], {"tiger": [1, 0]})], 20: [run(20, [1, 2], {"tiger": [1, 1]})]}, n_boot=10)
    plot(rows, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000
