import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from tasks import store
from tasks.ingest import (build_splits, bucketize, commit_and_publish, drop_short_users, fetch_source, gate_raw,
                          gate_splits, read_source, source_hash, stage_tables, with_buckets)
from tasks.quality import QualityGateError
from tasks.readers import InputError


def interactions(seqs: dict[int, list[int]], shuffle: bool = False) -> pl.DataFrame:
    rows = [(u, item, pos) for u, seq in seqs.items() for pos, item in enumerate(seq)]
    if shuffle:  # build_splits must order by position, not by row
        rows = rows[::-1]
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "position": pl.Int64}, orient="row")


def rows(frame: pl.DataFrame) -> list[tuple]:
    return frame.select("user_id", "target_pos", "history", "target").rows()


def test_splits_by_hand_with_max_history_2():
    splits = build_splits(interactions({0: [10, 11, 12, 13, 14], 1: [20, 21, 22]}, shuffle=True), max_history=2)
    # User 0, n = 5: test = position 4 (14), history = positions 2..3; valid = position 3 (13), history 1..2;
    # train = positions 1 .. n-3 = 1, 2: (11, [10]) and (12, [10, 11]).
    # User 1, n = 3: no train rows (positions 1 .. 0); valid (21, [20]); test (22, [20, 21]).
    assert rows(splits["test"]) == [(0, 4, [12, 13], 14), (1, 2, [20, 21], 22)]
    assert rows(splits["valid"]) == [(0, 3, [11, 12], 13), (1, 1, [20], 21)]
    assert rows(splits["train"]) == [(0, 1, [10], 11), (0, 2, [10, 11], 12)]


def test_split_schema():
    splits = build_splits(interactions({0: [1, 2, 3, 4]}), max_history=3)
    expected = {"user_id": pl.Int64, "target_pos": pl.Int64, "history": pl.List(pl.Int32), "target": pl.Int32}
    for name in ("train", "valid", "test"):
        assert dict(splits[name].schema) == expected, name


def test_sequences_shorter_than_max_history_keep_their_histories():
    # Regression: with an unsigned length, target_pos - max_history (1 - 20) wrapped around and
    # the slice came out empty. History = everything before the target.
    splits = build_splits(interactions({0: [5, 6, 7], 1: [1, 2, 3, 4]}), max_history=20)
    assert rows(splits["valid"]) == [(0, 1, [5], 6), (1, 2, [1, 2], 3)]
    assert rows(splits["test"]) == [(0, 2, [5, 6], 7), (1, 3, [1, 2, 3], 4)]
    assert rows(splits["train"]) == [(1, 1, [1], 2)]


def test_only_users_of_length_3_give_an_empty_train_split():
    splits = build_splits(interactions({0: [1, 2, 3], 1: [4, 5, 6]}), max_history=2)
    assert splits["train"].height == 0
    assert splits["valid"].height == splits["test"].height == 2


def reference_splits(seqs: dict[int, list[int]], h: int) -> dict[str, list[tuple]]:
    """The definition, one row at a time."""
    def row(u, s, p):
        return (u, p, s[max(0, p - h):p], s[p])

    return {
        "train": [row(u, s, p) for u, s in sorted(seqs.items()) for p in range(1, len(s) - 2)],
        "valid": [row(u, s, len(s) - 2) for u, s in sorted(seqs.items())],
        "test": [row(u, s, len(s) - 1) for u, s in sorted(seqs.items())],
    }


@settings(max_examples=40, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 30), min_size=3, max_size=9), min_size=1, max_size=5),
    h=st.integers(1, 5),
)
def test_splits_match_the_reference(seqs, h):
    by_user = dict(enumerate(seqs))
    splits = build_splits(interactions(by_user), max_history=h)
    expected = reference_splits(by_user, h)
    for name in ("train", "valid", "test"):
        assert rows(splits[name]) == expected[name], name


def test_bucketize_by_descending_frequency_ties_by_value():
    values = pl.Series("category", ["b", "a", None, "b", "c", "a", "d"])
    # Counts: a 2, b 2, c 1, d 1 -> a 1, b 2 (tie on 2, "a" < "b"), c 3, d 4 (tie on 1); null -> 0.
    assert bucketize(values).to_list() == [2, 1, 0, 2, 3, 1, 4]


def test_bucketize_all_null_is_all_unknown():
    # Datasets without item text (instruments) have no category at all.
    assert bucketize(pl.Series("brand", [None, None, None], dtype=pl.String)).to_list() == [0, 0, 0]


def test_with_buckets_adds_both_bucket_columns():
    items = pl.DataFrame({"item_id": [0, 1, 2, 3], "category": ["Glass", "Lab", "Glass", None],
                          "brand": ["Zeta", "Acme", "Acme", "Zeta"]})
    out = with_buckets(items)
    # category: Glass 2 -> 1, Lab 1 -> 2, null -> 0. brand: Acme 2, Zeta 2 -> tie, Acme 1, Zeta 2.
    assert out["category_bucket"].to_list() == [1, 2, 1, 0]
    assert out["brand_bucket"].to_list() == [2, 1, 1, 2]


def test_drop_short_users_renumbers_the_rest_densely():
    frame = interactions({0: [1, 2], 1: [3, 4, 5], 2: [6], 3: [7, 8, 9, 10]})
    out = drop_short_users(frame, 3)
    # Users 0 (2 items) and 2 (1 item) go; 1 -> 0 and 3 -> 1, rows and positions unchanged.
    assert out.rows() == [(0, 3, 0), (0, 4, 1), (0, 5, 2), (1, 7, 0), (1, 8, 1), (1, 9, 2), (1, 10, 3)]


def test_source_hash_follows_files_and_stored_settings(write_lcrec, make_params):
    root = write_lcrec()
    params = make_params(root)
    first = source_hash(params.dataset, params)
    assert source_hash(params.dataset, params) == first
    # max_history only shapes the splits, which are rebuilt on every run: same hash.
    assert source_hash(params.dataset, make_params(root, overrides=("data.max_history=5",))) == first
    # drop_short_users changes what is stored: new hash.
    assert source_hash(params.dataset, make_params(root, overrides=("data.drop_short_users=true",))) != first
    (root / "notes.txt").write_text("not a source file")
    assert source_hash(params.dataset, params) == first
    item = root / "Tiny.item.json"
    item.write_bytes(item.read_bytes() + b"\n")  # same JSON, different bytes
    assert source_hash(params.dataset, params) != first


def test_source_hash_covers_the_index_file(write_lcrec, make_params):
    root = write_lcrec(index={"7": ["<a_1>"], "9": ["<a_2>"], "40": ["<a_3>"], "100": ["<a_4>"]})
    params = make_params(root, index="Tiny.index.json")
    first = source_hash(params.dataset, params)
    (root / "Tiny.index.json").write_text(json.dumps({"7": ["<a_1>"], "9": ["<a_2>"], "40": ["<a_4>"],
                                                      "100": ["<a_3>"]}))
    assert source_hash(params.dataset, params) != first


def ingest(params) -> dict:
    spec, out_dir, report_dir = params.dataset, params.dataset_dir(), params.reports_dir()
    db_path = out_dir / "interactions.duckdb"
    fetch_source.fn(spec)
    src_hash = source_hash(spec, params)
    if db_path.exists() and store.latest_source_hash(db_path) == src_hash:
        items, inter, changed = store.read_table(db_path, "items"), store.read_table(db_path, "interactions"), False
    else:
        raw = read_source.fn(spec)
        inter = raw.interactions
        if params.data.drop_short_users:
            inter = drop_short_users(inter, params.data.min_sequence_length)
        items, changed = with_buckets(raw.items), True
    splits = build_splits(inter, params.data.max_history)
    n_users = inter["user_id"].n_unique()
    gates = gate_raw.fn(items, inter, params, report_dir)
    gates += gate_splits.fn(splits, items.height, n_users, params.data.max_history, report_dir)
    version = stage_tables.fn(out_dir, items, splits)
    if changed:
        commit_and_publish.fn(out_dir, db_path, version, items, inter, src_hash, raw.source_files)
    else:
        commit_and_publish.fn(out_dir, db_path, version)
    split_rows = {name: frame.height for name, frame in splits.items()}
    return {**store.counts(db_path), "changed": changed, "split_rows": split_rows, "source_hash": src_hash,
            "gates": gates, "db": db_path}


# Default tiny LC-Rec data (tests/conftest.py): users 1 [100, 40, 7], 2 [40, 7, 9], 10 [7, 9, 40, 100]
# -> 3 users, 4 items, 3 + 3 + 4 = 10 interactions; train rows: only user 10 (n = 4), position 1.
TINY_COUNTS = {"users": 3, "items": 4, "interactions": 10}


def test_ingest_writes_the_store_the_splits_and_the_gate_reports(write_lcrec, make_params):
    params = make_params(write_lcrec())
    result = ingest(params)
    assert {k: result[k] for k in TINY_COUNTS} == TINY_COUNTS
    assert result["changed"] is True
    assert result["split_rows"] == {"train": 1, "valid": 3, "test": 3}

    items = store.read_table(result["db"], "items")
    # Items 7, 9, 40, 100: leaves Pipettes, Glass, Glass, Lab -> Glass 1, Lab 2, Pipettes 3 -> [3, 1, 1, 2];
    # brands Acme, Zeta, Acme, blank -> Acme 1, Zeta 2, null 0 -> [1, 2, 1, 0].
    assert items["category_bucket"].to_list() == [3, 1, 1, 2]
    assert items["brand_bucket"].to_list() == [1, 2, 1, 0]

    # User 10 = dense 2, items 7, 9, 40, 100 = dense 0..3: test target 3, history [0, 1, 2] (max_history 20).
    test = pl.read_parquet(params.dataset_dir() / "splits" / "test.parquet")
    assert test.filter(pl.col("user_id") == 2).select("history", "target").rows() == [([0, 1, 2], 3)]
    assert pl.read_parquet(params.dataset_dir() / "items.parquet").height == 4

    gates_dir = params.reports_dir() / "gates"
    assert sorted(p.name for p in gates_dir.iterdir()) == sorted(
        f"{s}.json" for s in ("items", "interactions", "sequence_lengths", "split_train", "split_valid", "split_test")
    )
    assert all(g["success"] for g in result["gates"])


def test_unchanged_source_is_skipped_and_gives_the_same_splits(write_lcrec, make_params):
    params = make_params(write_lcrec())
    first = ingest(params)
    split_bytes = (params.dataset_dir() / "splits" / "train.parquet").read_bytes()
    # What the flow compares to decide to skip:
    assert store.latest_source_hash(first["db"]) == source_hash(params.dataset, params)

    second = ingest(params)
    assert second["changed"] is False
    assert store.read_table(second["db"], "ingests").height == 1
    # Splits rebuilt from the store are the ones built from the source, byte for byte.
    assert (params.dataset_dir() / "splits" / "train.parquet").read_bytes() == split_bytes


def test_changed_source_gets_a_new_hash_and_is_ingested_again(write_lcrec, make_params):
    root = write_lcrec()
    params = make_params(root)
    first = ingest(params)
    write_lcrec({"2": [40, 7, 9], "10": [7, 9, 40, 100], "1": [100, 40, 7], "3": [9, 9, 9]})
    assert source_hash(params.dataset, params) != first["source_hash"]

    second = ingest(params)
    assert second["changed"] is True
    assert {k: second[k] for k in TINY_COUNTS} == {"users": 4, "items": 4, "interactions": 13}  # + user 3
    assert store.read_table(second["db"], "ingests")["source_hash"].to_list() == [
        first["source_hash"], second["source_hash"]
    ]


def test_bad_input_leaves_the_previous_store_intact(write_lcrec, make_params):
    root = write_lcrec()
    params = make_params(root)
    first = ingest(params)
    inter = root / "Tiny.inter.json"
    inter.write_bytes(inter.read_bytes()[: inter.stat().st_size // 2])  # truncated

    with pytest.raises(InputError, match="Tiny.inter.json"):
        ingest(params)
    assert store.counts(first["db"]) == TINY_COUNTS
    assert store.read_table(first["db"], "ingests").height == 1
    assert store.latest_source_hash(first["db"]) == first["source_hash"]


def test_gate_failure_leaves_the_previous_store_intact(write_lcrec, make_params):
    root = write_lcrec()
    params = make_params(root)
    first = ingest(params)
    write_lcrec({"2": [40, 7, 9], "10": [7, 9, 40, 100], "1": [100, 40, 7], "3": [9, 40]})  # user 3: 2 < 3

    with pytest.raises(QualityGateError, match="sequence_length"):
        ingest(params)
    assert store.counts(first["db"]) == TINY_COUNTS
    assert store.latest_source_hash(first["db"]) == first["source_hash"]


def test_drop_short_users_lets_the_ingest_through(write_lcrec, make_params):
    root = write_lcrec({"2": [40, 7, 9], "10": [7, 9, 40, 100], "1": [100, 40, 7], "3": [9, 40]})
    result = ingest(make_params(root, overrides=("data.drop_short_users=true",)))
    # 3 + 3 + 4 + 2 = 12 interactions, minus user 3's 2 = 10: the tiny counts again.
    assert {k: result[k] for k in TINY_COUNTS} == TINY_COUNTS


def test_ingest_of_recbole_files(write_recbole, make_params):
    # The default RecBole data (tests/conftest.py: users 5 and 12, items 3, 7, 20) and a fourth
    # interaction for user 12 (3 + 3 would give no training row, and are refused).
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float", "5\t20\t3\t300", "5\t7\t1\t100",
             "12\t3\t5\t50", "5\t3\t4\t100", "12\t20\t2\t60", "12\t7\t2\t70", "12\t3\t1\t80"]
    params = make_params(write_recbole(inter), fmt="recbole", prefix="tiny")
    result = ingest(params)
    assert {k: result[k] for k in TINY_COUNTS} == {"users": 2, "items": 3, "interactions": 7}
    assert result["split_rows"] == {"train": 1, "valid": 2, "test": 2}  # n = 3 and 4: one train row
    # User 5 in time order: 7, 3, 20 -> dense 1, 0, 2; test target 2 with history [1, 0].
    test = pl.read_parquet(params.dataset_dir() / "splits" / "test.parquet")
    assert_frame_equal(test.filter(pl.col("user_id") == 0).select("history", "target"),
                       pl.DataFrame({"history": [[1, 0]], "target": [2]},
                                    schema={"history": pl.List(pl.Int32), "target": pl.Int32}))


def test_users_of_length_3_only_are_refused_with_a_clear_message(write_recbole, make_params):
    # Default RecBole data: users 5 and 12 with 3 interactions each -> n - 3 = 0 training rows each.
    params = make_params(write_recbole(), fmt="recbole", prefix="tiny")
    with pytest.raises(QualityGateError, match=r"training split is empty: none of the 2 users has more than "
                                               r"3 interactions"):
        ingest(params)
    assert not (params.dataset_dir() / "interactions.duckdb").exists()


def item_frame(titles: list[str | None]) -> pl.DataFrame:
    n = len(titles)
    return with_buckets(pl.DataFrame({
        "item_id": list(range(n)), "source_item_id": [str(i) for i in range(n)], "title": titles,
        "description": [None] * n, "brand": ["Acme"] * n, "category": ["Lab"] * n,
    }, schema={"item_id": pl.Int64, "source_item_id": pl.String, "title": pl.String, "description": pl.String,
               "brand": pl.String, "category": pl.String}))


@pytest.mark.parametrize("titles", [["a", "", "  "], ["", "", ""]])
def test_blank_titles_do_not_count_toward_min_title_share(make_params, tmp_path, titles):
    # min_title_share 0.5: ["a", "", "  "] has 1 title in 3 (0.33); ["", "", ""] has none, and is an
    # item file with blank titles, not a dataset without text (which skips the check).
    params = make_params(tmp_path, overrides=("data.min_title_share=0.5",))
    inter = interactions({0: [0, 1, 2]})
    with pytest.raises(QualityGateError, match="expect_column_values_to_not_be_null on column 'title'"):
        gate_raw.fn(item_frame(titles), inter, params, tmp_path)


def gate_reports(report_dir: Path, sub: str = "") -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((report_dir / "gates" / sub).glob("*.json"))}


def test_gate_reports_describe_the_stored_data_after_a_failed_run(write_lcrec, make_params):
    root = write_lcrec()
    params = make_params(root)
    first = ingest(params)
    stored = gate_reports(params.reports_dir())
    # Every report names the source it checked: here the one in the store.
    assert {name: r["source_hash"] for name, r in stored.items()} == {name: first["source_hash"] for name in stored}

    write_lcrec({"2": [40, 7, 9], "10": [7, 9, 40, 100], "1": [100, 40, 7], "3": [9, 40]})  # user 3: 2 < 3
    rejected_hash = source_hash(params.dataset, params)
    with pytest.raises(QualityGateError, match="sequence_length"):
        ingest(params)
    # gates/ still describes what is stored; the rejected input's reports are under gates/rejected/.
    assert gate_reports(params.reports_dir()) == stored
    assert store.latest_source_hash(first["db"]) == first["source_hash"]
    rejected = gate_reports(params.reports_dir(), "rejected")
    assert sorted(rejected) == ["interactions", "items", "sequence_lengths"]  # gate_raw stops at the failure
    assert rejected["sequence_lengths"]["success"] is False
    assert {r["source_hash"] for r in rejected.values()} == {rejected_hash}


# Peak RSS of build_splits for one user with n items, in MB above what the process held before.
MEMORY_PROBE = """
import resource, sys
import polars as pl
from tasks.ingest import build_splits
n = int(sys.argv[1])
frame = pl.DataFrame({"user_id": [0] * n, "item_id": [i % 997 for i in range(n)], "position": list(range(n))})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
splits = build_splits(frame, max_history=20)
assert splits["train"].height == n - 3
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_build_splits_memory_is_linear_in_one_users_sequence_length():
    # One user with 6,000 items: 5,997 training rows of at most 20 history ids (about 0.5 MB as
    # int32). Carrying the whole sequence on every row held 6,000 x 6,000 ids: 578 MB measured.
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, "6000"], capture_output=True, text=True,
                         cwd=root, env={"PYTHONPATH": str(root), "POLARS_MAX_THREADS": "2"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 100
