"""benchmarks.crossfit_selection: the cross-fitted score of the kept epoch, by hand; the in-sample
optimism it removes; pairing runs by user."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from benchmarks.crossfit_selection import compare, crossfit, run_report
from tasks import io
from tasks.training import VALID_RANKS


def test_each_user_is_scored_at_the_epoch_the_other_half_chose():
    # two users, each hit in one epoch only: whichever user chooses, the other is missed
    hits = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert crossfit(hits, 10, 0).tolist() == [0.0, 0.0]
    # an epoch best for everyone is chosen by every half: cross-fitted = in-sample
    steady = np.array([[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    assert crossfit(steady, 7, 1).tolist() == [1.0, 1.0, 1.0, 1.0]


def write_run(root, users, ranks_by_epoch):
    path = root / "data" / "ds" / "backbone" / "ckpt" / VALID_RANKS
    path.parent.mkdir(parents=True)
    rows = [(e + 1, u, r) for e, ranks in enumerate(ranks_by_epoch) for u, r in zip(users, ranks)]
    io.write_parquet(path, pl.DataFrame(rows, schema=["epoch", "user_id", "rank"], orient="row"))
    return root / "data"


def test_run_report_keeps_the_first_best_epoch_and_states_its_optimism(tmp_path):
    # epoch 1 hits users 10, 11 (ranks 3, 10); epoch 2 hits 12 and 13 (rank 11 is a miss at 10): tie, first kept
    d = write_run(tmp_path / "a", [10, 11, 12, 13], [[3, 10, 0, 11], [0, 0, 1, 2]])
    entry, users, values = run_report(d, "ds", 50, 0)
    assert users.tolist() == [10, 11, 12, 13]
    assert entry["kept_epoch"] == 1 and entry["in_sample"] == pytest.approx(0.5)
    assert entry["valid_recall@10"] == pytest.approx([0.5, 0.5])
    assert values[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert entry["optimism"] == pytest.approx(entry["in_sample"] - values[1].mean())
    assert 0.0 <= entry["crossfit"] <= 1.0


def test_runs_of_other_users_are_refused_and_the_same_users_paired(tmp_path):
    a = run_report(write_run(tmp_path / "a", [1, 2], [[1, 0]]), "ds", 5, 0)
    b = run_report(write_run(tmp_path / "b", [1, 2], [[1, 1]]), "ds", 5, 0)
    c = run_report(write_run(tmp_path / "c", [1, 3], [[1, 1]]), "ds", 5, 0)
    out = compare({"base": [(a[1], a[2])], "new": [(b[1], b[2])]}, 100)
    assert out["new"]["in_sample"]["diff"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="different validation users"):
        compare({"base": [(a[1], a[2])], "new": [(c[1], c[2])]}, 100)
    with pytest.raises(FileNotFoundError, match="no per-user validation ranks"):
        run_report(tmp_path / "missing", "ds", 5, 0)


def test_a_tie_on_the_choosing_half_goes_to_the_first_epoch():
    # users 1 and 3 tie epochs 0 and 1; when they choose, users 0 and 2 are scored at epoch 0 (misses)
    hits = np.array([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    scores = crossfit(hits, 300, 0)
    assert scores[1] == scores[3] == 1.0
    assert 0.0 < scores[0] < 1.0 and 0.0 < scores[2] < 1.0
