import json
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks import store


def items_frame(titles: list[str]) -> pl.DataFrame:
    n = len(titles)
    return pl.DataFrame(
        {"item_id": list(range(n)), "source_item_id": [str(10 + i) for i in range(n)], "title": titles},
        schema={"item_id": pl.Int64, "source_item_id": pl.String, "title": pl.String},
    )


def interactions_frame(seqs: list[list[int]]) -> pl.DataFrame:
    rows = [(u, str(100 + u), item, pos, None) for u, seq in enumerate(seqs) for pos, item in enumerate(seq)]
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "source_user_id": pl.String, "item_id": pl.Int64,
                                      "position": pl.Int64, "timestamp": pl.Int64}, orient="row")


# First ingest: 3 items, users 0 and 1 with 3 interactions each -> 2 users, 3 items, 6 interactions.
ITEMS_1 = items_frame(["a", "b", "c"])
INTER_1 = interactions_frame([[0, 1, 2], [2, 1, 0]])
# Second ingest: 2 items, one user with 4 interactions.
ITEMS_2 = items_frame(["x", "y"])
INTER_2 = interactions_frame([[0, 1, 0, 1]])


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "tiny" / "interactions.duckdb"
    assert store.replace_dataset(path, ITEMS_1, INTER_1, "hash-1", {"a.json": "f1"}) == 1
    return path


def assert_first_ingest_intact(path):
    assert_frame_equal(store.read_table(path, "items"), ITEMS_1)
    assert_frame_equal(store.read_table(path, "interactions"), INTER_1)
    assert store.read_table(path, "ingests").height == 1
    assert store.latest_source_hash(path) == "hash-1"
    assert store.counts(path) == {"users": 2, "items": 3, "interactions": 6}


def test_replace_writes_items_interactions_and_an_ingest_record(db):
    assert_frame_equal(store.read_table(db, "items"), ITEMS_1)
    assert_frame_equal(store.read_table(db, "interactions"), INTER_1)
    ingests = store.read_table(db, "ingests")
    assert ingests.select("ingest_id", "source_hash", "n_users", "n_items", "n_interactions").rows() == [
        (1, "hash-1", 2, 3, 6)
    ]
    assert json.loads(ingests["files"][0]) == {"a.json": "f1"}
    assert ingests["created_at"].null_count() == 0


def test_tables_are_stored_in_id_order(tmp_path):
    path = tmp_path / "db.duckdb"
    store.replace_dataset(path, ITEMS_1.reverse(), INTER_1.reverse(), "h", {})
    assert store.read_table(path, "items")["item_id"].to_list() == [0, 1, 2]
    with duckdb.connect(str(path), read_only=True) as con:  # physical order, without read_table's ORDER BY
        rows = con.execute("SELECT user_id, position FROM interactions").fetchall()
    assert rows == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_counts_read_back_users_items_interactions(db):
    assert store.counts(db) == {"users": 2, "items": 3, "interactions": 6}


def test_second_replace_replaces_the_data_and_appends_an_ingest(db):
    assert store.replace_dataset(db, ITEMS_2, INTER_2, "hash-2", {"a.json": "f2"}) == 2
    assert_frame_equal(store.read_table(db, "items"), ITEMS_2)
    assert store.counts(db) == {"users": 1, "items": 2, "interactions": 4}
    ingests = store.read_table(db, "ingests")
    assert ingests.select("ingest_id", "source_hash", "n_users", "n_items", "n_interactions").rows() == [
        (1, "hash-1", 2, 3, 6), (2, "hash-2", 1, 2, 4)
    ]
    assert store.latest_source_hash(db) == "hash-2"


def test_failed_create_rolls_back_the_items_already_replaced(db):
    # Items are replaced first; the interactions CREATE then fails (ORDER BY a missing column).
    broken = INTER_2.drop("position")
    with pytest.raises(duckdb.Error, match="position"):
        store.replace_dataset(db, ITEMS_2, broken, "hash-2", {})
    assert_first_ingest_intact(db)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_after_both_creates_rolls_back(db, monkeypatch, error):
    # The clock is read for the ingest record, after both tables were replaced.
    class BrokenClock:
        @staticmethod
        def now(tz=None):
            raise error("clock broke")

    monkeypatch.setattr(store, "datetime", BrokenClock)
    with pytest.raises(error, match="clock broke"):
        store.replace_dataset(db, ITEMS_2, INTER_2, "hash-2", {})
    monkeypatch.undo()
    assert_first_ingest_intact(db)


def test_failed_first_ingest_records_nothing(tmp_path):
    path = tmp_path / "db.duckdb"
    with pytest.raises(duckdb.Error):
        store.replace_dataset(path, ITEMS_1, INTER_1.drop("position"), "hash-1", {})
    assert store.latest_source_hash(path) is None
    with duckdb.connect(str(path), read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert tables == {"ingests"}


def test_latest_source_hash_of_a_missing_store_is_none_and_creates_nothing(tmp_path):
    path = tmp_path / "absent.duckdb"
    assert store.latest_source_hash(path) is None
    assert not path.exists()


def test_latest_source_hash_without_an_ingests_table_is_none(tmp_path):
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    assert store.latest_source_hash(path) is None


def test_read_table_refuses_other_names(db):
    with pytest.raises(ValueError, match="unknown table 'users'"):
        store.read_table(db, "users")


# Replaces the store's data with 50,000 interactions while no file may grow beyond the store's
# size + 100 kB, the way a full disk stops the write: COMMIT cannot write the WAL.
FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import polars as pl
from tasks import store
path = Path(sys.argv[1])
n = 50_000
items = pl.DataFrame({"item_id": [0], "source_item_id": ["a"], "title": ["x"]})
inter = pl.DataFrame({"user_id": [i // 10 for i in range(n)], "source_user_id": [f"user {i // 10:09d} " + "x" * 40
                      for i in range(n)], "item_id": [0] * n, "position": [i % 10 for i in range(n)],
                      "timestamp": [None] * n}, schema_overrides={"timestamp": pl.Int64})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100_000, resource.RLIM_INFINITY))
try:
    store.replace_dataset(path, items, inter, "hash-2", {})
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_failed_commit_reports_its_cause_not_the_rollback(db):
    # DuckDB ends the transaction itself when COMMIT fails; the ROLLBACK that followed raised
    # "cannot rollback - no transaction is active" and hid the cause.
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(db)], capture_output=True, text=True, cwd=root,
                         env={"PYTHONPATH": str(root)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("TransactionException"), out.stdout
    assert "Failed to commit: Could not write file" in out.stdout and "interactions.duckdb.wal" in out.stdout
    assert "cannot rollback" not in out.stdout
    assert_first_ingest_intact(db)
