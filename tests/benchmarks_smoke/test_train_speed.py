"""benchmarks.train_speed --dropout: every setting timed in every round, the ratios against dropout 0."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks import common, train_speed


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()  # main() sets 2 for the whole process
    yield
    torch.set_num_threads(n)


def test_dropout_mode_times_each_setting_five_times(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_speed", "--dropout", "--steps", "1", "--batch", "4"])
    train_speed.main()
    out = json.loads((tmp_path / "train_speed_dropout.json").read_text())
    assert [r["dropout"] for r in out["runs"]] == list(train_speed.DROPOUTS) * 5  # alternated, round by round
    assert set(out["median_samples_per_s"]) == {str(d) for d in train_speed.DROPOUTS}
    rate = out["median_samples_per_s"]
    assert out["time_ratio_to_0"] == {d: round(rate["0.0"] / r, 3) for d, r in rate.items()}
    assert out["time_ratio_to_0"]["0.0"] == 1.0


def test_one_mode_at_a_time(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_speed", "--dropout", "--cf-token"])
    with pytest.raises(SystemExit) as e:
        train_speed.main()
    assert e.value.code == 2
