"""The streaming (format: parquet) ingest: same store and splits as the polars path, clear
errors on bad rows, and nothing changed by a failed run."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks import store
from tasks.ingest import (SPLITS, build_splits, commit_and_publish, drop_short_users, gate_raw, gate_splits,
                          ingest_parquet, read_source, source_hash, stage_tables, with_buckets)
from tasks.params import ParamsError
from tasks.quality import QualityGateError
from tasks.readers import InputError


def write_parquet_source(root: Path, rows: list[tuple], items: dict | None = None, *,
                         id_type: type = int, rows_per_file: int = 0) -> Path:
    """rows: (user, item, timestamp, partition); each partition becomes `interactions/day=<p>/`,
    split into files of `rows_per_file` rows (0: one file), keeping the given row order."""
    root.mkdir(parents=True, exist_ok=True)
    schema = {"user_id": pl.String if id_type is str else pl.Int64,
              "item_id": pl.String if id_type is str else pl.Int64, "timestamp": pl.Int64}
    for part in sorted({r[3] for r in rows}):
        mine = [(id_type(u) if u is not None else None, id_type(i), t) for u, i, t, p in rows if p == part]
        folder = root / "interactions" / f"day={part}"
        folder.mkdir(parents=True, exist_ok=True)
        size = rows_per_file or len(mine)
        for k in range(0, len(mine), size):
            frame = pl.DataFrame(mine[k:k + size], schema=schema, orient="row")
            frame.write_parquet(folder / f"part-{k // size}.parquet")
    if items is not None:
        pl.DataFrame([{"item_id": id_type(k), **v} for k, v in items.items()]).write_parquet(root / "items.parquet")
    return root


def synthetic(n_users: int = 30, n_items: int = 25, seed: int = 0) -> dict[int, list[int]]:
    """Users with sparse integer ids and sequences of 3..30 items (some longer than max_history)."""
    rng = np.random.default_rng(seed)
    users = rng.choice(1000, size=n_users, replace=False)
    return {int(u): [int(i) for i in rng.integers(0, n_items, size=int(rng.integers(3, 31)))] for u in users}


def as_rows(seqs: dict[int, list[int]], seed: int = 1) -> list[tuple]:
    """One row per interaction, timestamp = 10 * position (+ a shared offset), spread over
    three day partitions and shuffled: the ingest must restore the order from the timestamps."""
    rows = [(u, item, 1000 + 10 * pos, (u + pos) % 3) for u, seq in seqs.items() for pos, item in enumerate(seq)]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[k] for k in order]


def lcrec_items(item_ids) -> dict[str, dict]:
    return {str(i): {"title": f"item {i}", "brand": ["Acme", "Zeta", " "][i % 3],
                     "categories": f"Lab,{['Glass', 'Tools'][i % 2]}"} for i in item_ids}


def polars_ingest(params) -> dict:
    """The in-memory path, as flows/ingest.py runs it for a changed source."""
    spec, out_dir, report_dir = params.dataset, params.dataset_dir(), params.reports_dir()
    raw = read_source.fn(spec)
    inter = raw.interactions
    if params.data.drop_short_users:
        inter = drop_short_users(inter, params.data.min_sequence_length)
    items = with_buckets(raw.items)
    splits = build_splits(inter, params.data.max_history)
    gate_raw.fn(items, inter, params, report_dir)
    gate_splits.fn(splits, items.height, inter["user_id"].n_unique(), params.data.max_history, report_dir)
    version = stage_tables.fn(out_dir, items, splits)
    commit_and_publish.fn(out_dir, out_dir / "interactions.duckdb", version, items, inter, source_hash(spec, params),
                          raw.source_files)
    return {"dir": out_dir}


def stream_ingest(params) -> dict:
    out_dir = params.dataset_dir()
    result = ingest_parquet.fn(params.dataset, params, out_dir / "interactions.duckdb", out_dir,
                               params.reports_dir(), source_hash(params.dataset, params))
    return {**result, "dir": out_dir, "db": out_dir / "interactions.duckdb"}


def read_outputs(out_dir: Path) -> dict[str, pl.DataFrame]:
    tables = {name: pl.read_parquet(out_dir / "splits" / f"{name}.parquet").sort("user_id", "target_pos")
              for name in SPLITS}
    tables["items"] = pl.read_parquet(out_dir / "items.parquet")
    db = out_dir / "interactions.duckdb"
    tables["store_items"] = store.read_table(db, "items")
    tables["store_interactions"] = store.read_table(db, "interactions").drop("timestamp")
    return tables


@pytest.mark.parametrize("id_type", [int, str])
@pytest.mark.parametrize("overrides", [(), ("data.max_history=4",), ("data.drop_short_users=true",
                                                                       "data.min_sequence_length=6")])
def test_streaming_path_gives_the_polars_paths_store_and_splits(write_lcrec, make_params, tmp_path,
                                                                 id_type, overrides):
    seqs = synthetic()
    items = lcrec_items(range(25))
    lcrec = make_params(write_lcrec({str(u): s for u, s in seqs.items()}, items), overrides=overrides)
    polars_ingest(lcrec)
    # The same interactions as partitioned Parquet, ids as ints or as strings of digits (numeric order).
    parquet_root = write_parquet_source(tmp_path / "pq", as_rows(seqs), items, id_type=id_type, rows_per_file=40)
    streamed = make_params(parquet_root, fmt="parquet", overrides=(
        *overrides, f"data.data_dir={json.dumps(str(tmp_path / 'data_stream'))}",
        f"data.reports_dir={json.dumps(str(tmp_path / 'reports_stream'))}"))
    result = stream_ingest(streamed)

    expected, got = read_outputs(lcrec.dataset_dir()), read_outputs(result["dir"])
    assert expected["train"].height > 0
    for name in expected:
        assert_frame_equal(got[name], expected[name])
    if overrides and "drop_short_users" in overrides[0]:
        assert expected["test"].height < len(seqs)  # some users were dropped, the rest renumbered alike
    assert result["split_rows"] == {name: expected[name].height for name in SPLITS}
    assert all(g["success"] for g in result["gates"])


def test_order_is_timestamp_then_file_then_row(make_params, tmp_path):
    # User "al": ts 5 (item b), then a tie at ts 1 between c (day=0, row 1) and a (day=0, row 2)
    # and d (day=1, row 0): file order day=0 < day=1, then row -> c, a, d, b.
    # User "bob": a, b, c at ts 1, 2, 3. Ids are not all digits: lexicographic ("al" < "bob";
    # items a b c d -> 0 1 2 3).
    rows = [("al", "b", 5, 0), ("al", "c", 1, 0), ("al", "a", 1, 0), ("al", "d", 1, 1),
            ("bob", "c", 3, 1), ("bob", "a", 1, 1), ("bob", "b", 2, 0)]
    root = write_parquet_source(tmp_path / "pq", rows, id_type=str)
    params = make_params(root, fmt="parquet", overrides=("data.max_history=2",))
    result = stream_ingest(params)

    inter = store.read_table(result["db"], "interactions")
    assert inter.select("user_id", "source_user_id", "item_id", "position", "timestamp").rows() == [
        (0, "al", 2, 0, 1), (0, "al", 0, 1, 1), (0, "al", 3, 2, 1), (0, "al", 1, 3, 5),
        (1, "bob", 0, 0, 1), (1, "bob", 1, 1, 2), (1, "bob", 2, 2, 3)]
    test = pl.read_parquet(params.dataset_dir() / "splits" / "test.parquet")
    # al: c a d b -> 2 0 3 1; test target 1 with the last 2 as history; bob: 0 1 2.
    assert test.rows() == [(0, 3, [0, 3], 1), (1, 2, [0, 1], 2)]
    train = pl.read_parquet(params.dataset_dir() / "splits" / "train.parquet")
    assert train.rows() == [(0, 1, [2], 0)]  # al, n = 4: only position 1
    assert result["items"] == 4 and result["users"] == 2 and result["interactions"] == 7


def test_a_null_user_id_names_the_file_the_field_and_the_row(make_params, tmp_path):
    rows = [(1, 10, 1, 0), (1, 11, 2, 0), (1, 12, 3, 0), (2, 10, 1, 1), (None, 11, 2, 1), (2, 12, 3, 1)]
    root = write_parquet_source(tmp_path / "pq", rows)
    with pytest.raises(InputError, match=r"day=1/part-0\.parquet: row 1 \(counting from 0\), field 'user_id': null"):
        stream_ingest(make_params(root, fmt="parquet"))


def test_an_item_missing_from_items_parquet_names_the_row(make_params, tmp_path):
    rows = [(1, 10, 1, 0), (1, 11, 2, 0), (1, 99, 3, 0)]
    root = write_parquet_source(tmp_path / "pq", rows, {10: {"title": "a"}, 11: {"title": "b"}})
    with pytest.raises(InputError, match=r"day=0/part-0\.parquet: row 2 .*'item_id': item '99' is not in items"):
        stream_ingest(make_params(root, fmt="parquet"))


def test_a_column_missing_from_every_file_is_named(make_params, tmp_path):
    root = tmp_path / "pq"
    (root / "interactions").mkdir(parents=True)
    pl.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3]}).write_parquet(root / "interactions" / "a.parquet")
    with pytest.raises(InputError, match="field 'timestamp': missing from every file"):
        stream_ingest(make_params(root, fmt="parquet"))


def snapshot(out_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failure", ["interrupt", "gate"])
def test_a_failed_ingest_leaves_the_earlier_outputs_intact(make_params, tmp_path, monkeypatch, failure):
    seqs = {1: [10, 11, 12, 13], 2: [11, 12, 13]}
    root = write_parquet_source(tmp_path / "pq", as_rows(seqs))
    params = make_params(root, fmt="parquet")
    first = stream_ingest(params)
    first_hash = source_hash(params.dataset, params)
    before = snapshot(params.dataset_dir())
    gates_before = snapshot(params.reports_dir() / "gates")
    assert {json.loads(v)["source_hash"] for v in gates_before.values()} == {first_hash}

    if failure == "interrupt":
        # New files (user 3 over every partition); the run is interrupted when it writes the
        # ingest record, after the tables were replaced and every split was written to its temp
        # file. Four items: three would give an empty training split, refused before that point.
        write_parquet_source(root, as_rows({3: [10, 10, 10, 11]}, seed=2))

        class Interrupted:
            @staticmethod
            def now(tz=None):
                raise KeyboardInterrupt("stop")

        monkeypatch.setattr(store, "datetime", Interrupted)
        with pytest.raises(KeyboardInterrupt):
            stream_ingest(params)
        monkeypatch.undo()
    else:
        # User 3 has 2 interactions < min_sequence_length 3: the sequence-length gate fails.
        pl.DataFrame({"user_id": [3, 3], "item_id": [10, 11], "timestamp": [1, 2]}).write_parquet(
            root / "interactions" / "day=0" / "short.parquet")
        with pytest.raises(QualityGateError, match="sequence_length"):
            stream_ingest(params)
        # The rejected input's reports, beside (not over) the stored data's.
        rejected = json.loads((params.reports_dir() / "gates" / "rejected" / "sequence_lengths.json").read_text())
        assert rejected["success"] is False
        assert rejected["source_hash"] == source_hash(params.dataset, params) != first_hash

    # The same files (no temp file or spill folder left), the Parquet ones byte for byte, and
    # the store as it was (the transaction rolled back).
    after = snapshot(params.dataset_dir())
    assert sorted(after) == sorted(before)
    assert store.latest_source_hash(first["db"]) == first_hash
    assert store.read_table(first["db"], "ingests").height == 1
    assert store.counts(first["db"]) == {"users": 2, "items": 4, "interactions": 7}
    assert {k: v for k, v in after.items() if k.endswith(".parquet")} == \
        {k: v for k, v in before.items() if k.endswith(".parquet")}
    # The gate reports still describe the stored data.
    gates_after = snapshot(params.reports_dir() / "gates")
    assert {k: v for k, v in gates_after.items() if not k.startswith("rejected/")} == gates_before


def test_unchanged_source_keeps_the_store_and_rebuilds_the_splits(make_params, tmp_path):
    root = write_parquet_source(tmp_path / "pq", as_rows(synthetic(n_users=8)))
    params = make_params(root, fmt="parquet")
    first = stream_ingest(params)
    splits = {n: pl.read_parquet(params.dataset_dir() / "splits" / f"{n}.parquet") for n in SPLITS}
    assert first["changed"] is True

    second = stream_ingest(params)
    assert second["changed"] is False
    assert store.read_table(second["db"], "ingests").height == 1
    for n in SPLITS:
        assert_frame_equal(pl.read_parquet(params.dataset_dir() / "splits" / f"{n}.parquet"), splits[n])
    # A new max_history only reshapes the splits: still the same source hash, shorter histories.
    shorter = stream_ingest(make_params(root, fmt="parquet", overrides=("data.max_history=2",)))
    assert shorter["changed"] is False
    test = pl.read_parquet(params.dataset_dir() / "splits" / "test.parquet")
    assert test["history"].list.len().max() == 2


def test_parquet_spec_and_memory_limit_are_validated(make_params, tmp_path):
    root = tmp_path / "pq"
    with pytest.raises(ParamsError, match="index and fetch are not supported with format parquet"):
        make_params(root, fmt="parquet", index="x.json")
    with pytest.raises(ParamsError, match="data.ingest_memory_limit"):
        make_params(root, fmt="parquet", overrides=("data.ingest_memory_limit=lots",))
    with pytest.raises(ParamsError, match="data.ingest_memory_limit"):
        make_params(root, fmt="parquet", overrides=("data.ingest_memory_limit='1GB; DROP TABLE items'",))
    assert make_params(root, fmt="parquet", overrides=("data.ingest_memory_limit=512MiB",)).dataset.hive_partitioning


def test_users_of_length_3_only_are_refused_with_a_clear_message(make_params, tmp_path):
    # Every user has 3 interactions: a valid and a test row each, no training row.
    root = write_parquet_source(tmp_path / "pq", as_rows({1: [10, 11, 12], 2: [11, 12, 13]}))
    params = make_params(root, fmt="parquet")
    with pytest.raises(QualityGateError, match=r"training split is empty: none of the 2 users has more than "
                                               r"3 interactions"):
        stream_ingest(params)
    assert store.latest_source_hash(params.dataset_dir() / "interactions.duckdb") is None
