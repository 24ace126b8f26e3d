"""Great Expectations gates. GE's first import takes seconds, so every gate test lives here."""

import json

import polars as pl
import pytest

from tasks.ingest import build_splits, gate_raw, gate_splits, with_buckets
from tasks.quality import MAX_SHOWN_ROWS, QualityGateError, gx_expectations, run_gate


@pytest.fixture(scope="module")
def gxe():
    return gx_expectations()


def failure(call) -> str:
    with pytest.raises(QualityGateError) as info:
        call()
    return str(info.value)


def test_passing_frame_returns_success_and_writes_the_report(gxe, tmp_path):
    frame = pl.DataFrame({"item_id": [0, 1, 2], "title": ["a", "b", None]})
    summary = run_gate("demo_pass", frame, [
        gxe.ExpectColumnValuesToBeBetween(column="item_id", min_value=0, max_value=2),
        gxe.ExpectColumnValuesToNotBeNull(column="title", mostly=0.6),  # 2 of 3 = 0.67 >= 0.6
    ], tmp_path)
    assert summary == {"suite": "demo_pass", "success": True, "expectations": 2, "rows": 3}
    report = json.loads((tmp_path / "gates" / "demo_pass.json").read_text())
    assert report["success"] is True
    assert len(report["results"]) == 2


def test_no_report_dir_writes_nothing(gxe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_gate("demo_quiet", pl.DataFrame({"x": [1]}), [gxe.ExpectColumnValuesToNotBeNull(column="x")], None)
    assert list(tmp_path.iterdir()) == []


def test_failure_names_expectation_and_column_and_shows_rows(gxe, tmp_path):
    frame = pl.DataFrame({"item_id": [0, -1, 2, -5], "title": ["a", "b", "c", "d"]})
    message = failure(lambda: run_gate("demo_fail", frame, [
        gxe.ExpectColumnValuesToBeBetween(column="item_id", min_value=0),
        gxe.ExpectColumnValuesToNotBeNull(column="title"),  # passes: not listed
    ], tmp_path))
    assert "quality gate 'demo_fail' failed" in message
    assert "expect_column_values_to_be_between on column 'item_id'" in message
    assert "2 of 4 rows unexpected" in message  # -1 and -5
    assert '{"item_id": -1, "title": "b"}' in message
    assert '{"item_id": -5, "title": "d"}' in message
    assert "not_be_null" not in message
    # The report is written before the error, so the failure can be inspected afterwards.
    assert json.loads((tmp_path / "gates" / "demo_fail.json").read_text())["success"] is False


def test_failure_shows_at_most_a_few_rows(gxe):
    frame = pl.DataFrame({"x": [-1, -2, -3, -4, -5, -6, -7]})
    message = failure(lambda: run_gate("demo_many", frame, [gxe.ExpectColumnValuesToBeBetween(column="x", min_value=0)],
                                       None))
    assert "7 of 7 rows unexpected" in message
    assert message.count('{"x": ') == MAX_SHOWN_ROWS


def test_compound_uniqueness_failure_names_the_columns(gxe):
    frame = pl.DataFrame({"user_id": [0, 0, 1], "position": [0, 0, 0]})
    message = failure(lambda: run_gate("demo_pairs", frame, [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "position"])
    ], None))
    # Rows 0 and 1 share (0, 0).
    assert "expect_compound_columns_to_be_unique on column ['user_id', 'position']" in message
    assert "2 of 3 rows unexpected" in message


def test_table_level_failure_shows_the_observed_value(gxe):
    message = failure(lambda: run_gate("demo_rows", pl.DataFrame({"x": [1, 2]}),
                                       [gxe.ExpectTableRowCountToEqual(value=3)], None))
    assert "expect_table_row_count_to_equal" in message
    assert "observed: 2" in message


@pytest.fixture
def params(make_params, tmp_path):
    return make_params(tmp_path, overrides=("data.min_sequence_length=3", "data.min_title_share=0.5"))


def raw_frames(seqs: list[list[int]], titles: list[str | None]) -> tuple[pl.DataFrame, pl.DataFrame]:
    n = len(titles)
    items = with_buckets(pl.DataFrame({
        "item_id": list(range(n)), "source_item_id": [str(i) for i in range(n)], "title": titles,
        "description": [None] * n, "brand": ["Acme"] * n, "category": ["Lab"] * n,
    }, schema_overrides={"description": pl.String}))
    rows = [(u, i, p) for u, seq in enumerate(seqs) for p, i in enumerate(seq)]
    inter = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "position": pl.Int64}, orient="row")
    return items, inter


def test_gate_raw_passes_good_data(params, tmp_path):
    items, inter = raw_frames([[0, 1, 2], [2, 1, 0, 1]], ["a", "b", "c"])
    reports = gate_raw.fn(items, inter, params, tmp_path)
    assert [r["suite"] for r in reports] == ["items", "interactions", "sequence_lengths"]
    assert [r["rows"] for r in reports] == [3, 7, 2]  # 3 items, 3 + 4 interactions, 2 users


def test_gate_raw_fails_on_a_short_sequence(params, tmp_path):
    items, inter = raw_frames([[0, 1, 2], [2, 1]], ["a", "b", "c"])
    message = failure(lambda: gate_raw.fn(items, inter, params, tmp_path))
    assert "'sequence_lengths'" in message
    assert "on column 'sequence_length'" in message
    assert '{"user_id": 1, "sequence_length": 2}' in message


def test_gate_raw_uses_min_sequence_length(make_params, tmp_path):
    params = make_params(tmp_path, overrides=("data.min_sequence_length=4",))
    items, inter = raw_frames([[0, 1, 2, 0], [2, 1, 0]], ["a", "b", "c"])  # user 1: 3 < 4
    assert '{"user_id": 1, "sequence_length": 3}' in failure(lambda: gate_raw.fn(items, inter, params, tmp_path))


def test_gate_raw_fails_below_the_title_share(params, tmp_path):
    # 1 title in 3 items = 0.33 < min_title_share 0.5.
    items, inter = raw_frames([[0, 1, 2]], ["a", None, None])
    message = failure(lambda: gate_raw.fn(items, inter, params, tmp_path))
    assert "expect_column_values_to_not_be_null on column 'title'" in message
    assert "2 of 3 rows unexpected" in message


def test_gate_raw_skips_the_title_check_when_there_is_no_text(params, tmp_path):
    items, inter = raw_frames([[0, 1, 2]], [None, None, None])  # instruments: no item file at all
    assert gate_raw.fn(items, inter, params, tmp_path)[0]["expectations"] == 6  # the 6 id/bucket checks only


def test_gate_raw_fails_on_an_item_outside_the_catalog(params, tmp_path):
    items, inter = raw_frames([[0, 1, 3]], ["a", "b", "c"])  # item 3, but ids are 0..2
    message = failure(lambda: gate_raw.fn(items, inter, params, tmp_path))
    assert "'interactions'" in message and "on column 'item_id'" in message
    assert '{"user_id": 0, "item_id": 3, "position": 2}' in message


@pytest.fixture
def splits():
    # Users 0 [0, 1, 2, 3] and 1 [3, 2, 1]: train 1 row, valid 2, test 2.
    inter = pl.DataFrame({"user_id": [0, 0, 0, 0, 1, 1, 1], "item_id": [0, 1, 2, 3, 3, 2, 1],
                          "position": [0, 1, 2, 3, 0, 1, 2]})
    return build_splits(inter, max_history=2)


def test_gate_splits_passes(splits, tmp_path):
    reports = gate_splits.fn(splits, 4, 2, 2, tmp_path)
    assert [(r["suite"], r["rows"]) for r in reports] == [("split_train", 1), ("split_valid", 2), ("split_test", 2)]
    assert (tmp_path / "gates" / "split_test.json").exists()


def test_gate_splits_fails_when_a_split_misses_a_user(splits, tmp_path):
    splits["valid"] = splits["valid"].filter(pl.col("user_id") != 1)
    message = failure(lambda: gate_splits.fn(splits, 4, 2, 2, tmp_path))
    assert "'split_valid'" in message
    assert "expect_table_row_count_to_equal" in message and "observed: 1" in message


def test_gate_splits_fails_on_an_empty_history(splits, tmp_path):
    splits["test"] = splits["test"].with_columns(
        pl.when(pl.col("user_id") == 0).then(pl.lit([], dtype=pl.List(pl.Int32))).otherwise("history").alias("history")
    )
    message = failure(lambda: gate_splits.fn(splits, 4, 2, 2, tmp_path))
    assert "'split_test'" in message and "on column 'history_length'" in message
    assert '"history_length": 0' in message


def test_gate_splits_fails_on_a_target_outside_the_catalog(splits, tmp_path):
    # n_items = 3, ids 0..2. Targets: train 1; valid 2, 2; test 3 (user 0), 1: only the test split fails.
    message = failure(lambda: gate_splits.fn(splits, 3, 2, 2, tmp_path))
    assert "'split_test'" in message and "on column 'target'" in message
    assert '"user_id": 0' in message and '"target": 3' in message
