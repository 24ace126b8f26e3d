"""benchmarks/epoch_curves.py: reading the backbone logs, the kept epochs and the mean curve."""

from __future__ import annotations

import pytest

from benchmarks import epoch_curves
from benchmarks.epoch_curves import read_curve, summarise


def write_log(run, rows, dataset="ds"):
    path = run / "reports" / dataset / "backbone_log.csv"
    path.parent.mkdir(parents=True)
    lines = ["epoch,loss,valid_recall@10"] + [f"{e},1.0,{r}" for e, r in rows]
    path.write_text("\n".join(lines) + "\n")
    return run


def test_kept_epochs_and_the_mean_over_the_epochs_every_run_reached(tmp_path):
    a = write_log(tmp_path / "a", [(2, 0.2), (1, 0.1), (3, 0.15)])  # rows out of order are sorted
    b = write_log(tmp_path / "b", [(1, 0.3), (2, 0.2), (3, 0.1), (4, 0.5)])
    curves = {str(a): read_curve(a, "ds"), str(b): read_curve(b, "ds")}
    assert [r["epoch"] for r in curves[str(a)]] == [1, 2, 3]
    s = summarise(curves)
    assert s["runs"][str(a)]["kept_epoch"] == 2 and s["runs"][str(b)]["kept_epoch"] == 4
    assert [r["epoch"] for r in s["mean"]] == [1, 2, 3]  # epoch 4: only b reached it
    assert s["mean"][0]["valid_recall@10"] == pytest.approx(0.2)
    assert s["mean_kept_valid_recall@10"] == pytest.approx(0.35)


def test_a_bad_log_names_the_file_and_the_row(tmp_path):
    run = write_log(tmp_path / "r", [(1, 0.1)])
    log = run / "reports" / "ds" / "backbone_log.csv"
    log.write_text(log.read_text() + "2,1.0,oops\n")
    with pytest.raises(ValueError, match=r"backbone_log.csv: row 3: field epoch or valid_recall@10"):
        read_curve(run, "ds")
    with pytest.raises(FileNotFoundError, match="no backbone log"):
        read_curve(tmp_path / "missing", "ds")


def test_main_writes_the_json_and_the_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(epoch_curves, "RESULTS", tmp_path)
    monkeypatch.setattr("benchmarks.common.RESULTS", tmp_path)
    a = write_log(tmp_path / "a", [(1, 0.1), (2, 0.2)])
    b = write_log(tmp_path / "b", [(1, 0.1), (2, 0.3), (3, 0.25)])
    out = epoch_curves.main(["--dataset", "ds", "--name", "t", "--group", "five", str(a), "--group", "ten", str(b)])
    assert out["groups"]["ten"]["runs"][str(b)]["kept_epoch"] == 2
    assert (tmp_path / "epoch_curves_t.json").is_file() and (tmp_path / "epoch_curves_t.png").stat().st_size > 1000
