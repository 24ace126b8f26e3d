"""A Parquet log that grows by partitions is appended to the store: stored ids and positions stay,
the splits follow, and a partition ingested before changes nothing."""

import shutil

import polars as pl

from tasks import store
from tests.tasks.test_ingest_stream import stream_ingest, write_parquet_source

# Day 1: users 10 and 20, items 100..103 -> dense users 0, 1 and items 0..3.
DAY1 = [(10, 100, 1, 1), (10, 101, 2, 1), (10, 102, 3, 1), (10, 103, 4, 1),
        (20, 101, 1, 1), (20, 102, 2, 1), (20, 103, 3, 1), (20, 100, 4, 1)]
# Day 2: user 20 buys 104; user 5 is new. A full ingest would number 5 first; the append gives it
# id 2, after the stored users, and items 104, 105 ids 4, 5.
DAY2 = [(20, 104, 5, 2), (5, 100, 4, 2), (5, 104, 5, 2), (5, 105, 6, 2), (5, 101, 7, 2)]


def interactions(db) -> list[tuple]:
    return [tuple(r) for r in store.read_table(db, "interactions")
            .select("user_id", "source_user_id", "item_id", "position").iter_rows()]


def split(params, name) -> list[tuple]:
    frame = pl.read_parquet(params.dataset_dir() / "splits" / f"{name}.parquet")
    return [(r["user_id"], r["history"], r["target"]) for r in frame.iter_rows(named=True)]


def test_a_new_partition_is_appended_without_renumbering(make_params, tmp_path):
    root = write_parquet_source(tmp_path / "pq", DAY1)
    params = make_params(root, fmt="parquet")
    first = stream_ingest(params)
    assert first["mode"] == "full"
    before = interactions(first["db"])

    write_parquet_source(root, DAY2)
    second = stream_ingest(params)
    assert second["mode"] == "append" and second["appended"]["files"] == [
        (root / "interactions" / "day=2" / "part-0.parquet").as_posix()]
    after = interactions(second["db"])
    assert sorted(after) == sorted(before + [(1, "20", 4, 4), (2, "5", 0, 0), (2, "5", 4, 1), (2, "5", 5, 2),
                                             (2, "5", 1, 3)])
    items = store.read_table(second["db"], "items")
    assert items["source_item_id"].to_list() == ["100", "101", "102", "103", "104", "105"]
    # Splits follow: each user's last item is its test target, the one before its validation target.
    assert split(params, "test") == [(0, [0, 1, 2], 3), (1, [1, 2, 3, 0], 4), (2, [0, 4, 5], 1)]
    assert split(params, "valid") == [(0, [0, 1], 2), (1, [1, 2, 3], 0), (2, [0, 4], 5)]
    assert store.read_table(second["db"], "ingests").height == 2
    assert store.read_table(second["db"], "exports").height == 2

    # The same partition again, and a copy of it under another name: nothing changes.
    again = stream_ingest(params)
    shutil.copy(root / "interactions" / "day=2" / "part-0.parquet", root / "interactions" / "day=2" / "copy.parquet")
    copy = stream_ingest(params)
    assert again["mode"] == copy["mode"] == "unchanged"
    assert copy["appended"]["duplicates_skipped"] == [(root / "interactions" / "day=2" / "copy.parquet").as_posix()]
    assert interactions(copy["db"]) == after
    assert store.read_table(copy["db"], "ingests").height == 2
    assert store.read_table(copy["db"], "exports").height == 2


def test_a_changed_partition_is_ingested_whole(make_params, tmp_path):
    root = write_parquet_source(tmp_path / "pq", DAY1)
    params = make_params(root, fmt="parquet")
    stream_ingest(params)
    write_parquet_source(root, DAY1[:7] + [(20, 105, 4, 1)] + DAY2)  # day 1 rewritten
    result = stream_ingest(params)
    assert result["mode"] == "full"
    assert interactions(result["db"])[:2] == [(0, "5", 0, 0), (0, "5", 4, 1)]  # user 5 renumbered first


def test_a_user_below_the_threshold_joins_with_its_earlier_rows(make_params, tmp_path):
    """With drop_short_users, user 30 (two rows on day 1) is not stored; its third row on day 2
    brings it in with all three."""
    root = write_parquet_source(tmp_path / "pq", DAY1 + [(30, 100, 1, 1), (30, 101, 2, 1)])
    params = make_params(root, fmt="parquet", overrides=("data.drop_short_users=true",))
    first = stream_ingest(params)
    assert {r[1] for r in interactions(first["db"])} == {"10", "20"}
    write_parquet_source(root, [(30, 102, 3, 2)])
    second = stream_ingest(params)
    assert second["mode"] == "append"
    assert [r for r in interactions(second["db"]) if r[1] == "30"] == [(2, "30", 0, 0), (2, "30", 1, 1),
                                                                        (2, "30", 2, 2)]
