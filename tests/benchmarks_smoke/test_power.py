"""benchmarks.power: the paired standard error and detectable differences, by hand."""

from __future__ import annotations

import math

import polars as pl
import pytest

from benchmarks.power import hits, power_of


def test_power_of_by_hand(tmp_path):
    # a hits users 1, 2; b hits user 1 only; user 5 is b's alone and is left out
    # (1-based target ranks, 0 = not retrieved, as the evaluate stage writes them)
    pl.DataFrame({"user_id": [1, 2, 3, 4], "rank": [1, 10, 11, 0]}).write_parquet(tmp_path / "a.parquet")
    pl.DataFrame({"user_id": [1, 2, 3, 4, 5], "rank": [4, 13, 0, 50, 1]}).write_parquet(tmp_path / "b.parquet")
    a, b = hits(tmp_path / "a.parquet"), hits(tmp_path / "b.parquet")
    assert a == {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0}
    got = power_of(a, b)
    # d = [0, 1, 0, 0]: mean 0.25, sample sd 0.5, se 0.25
    assert got["users"] == 4 and got["diff"] == pytest.approx(0.25) and got["relative"] == pytest.approx(1.0)
    assert got["sd"] == pytest.approx(0.5) and got["se"] == pytest.approx(0.25)
    assert got["p05_threshold"] == pytest.approx(1.959964 * 0.25)
    assert got["mde80"] == pytest.approx(2.801585 * 0.25)
    assert got["users_for_5pct"] == math.ceil((2.801585 * 0.5 / (0.05 * 0.25)) ** 2)
    with pytest.raises(ValueError, match="share 0 users"):
        power_of(a, {9: 1.0})
