"""The DuckDB interaction store: one file per dataset, `data/<dataset>/interactions.duckdb`.

Tables: `items` (item_id, source_item_id, title, description, brand, categories,
category, category_bucket, brand_bucket), `interactions` (user_id, source_user_id,
item_id, position, timestamp) and `ingests` (one row per ingest that changed the data:
source hash, file hashes, counts, time). A changed source replaces `items` and
`interactions` in one transaction; a failure rolls back and the previous content stays.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

INGESTS_DDL = """
CREATE TABLE IF NOT EXISTS ingests (
    ingest_id INTEGER PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL,
    source_hash VARCHAR NOT NULL,
    files JSON NOT NULL,
    n_users BIGINT NOT NULL,
    n_items BIGINT NOT NULL,
    n_interactions BIGINT NOT NULL
)
"""


def connect(path: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    path.parent.mkdir(parents=True, exist_ok=True)
    return duckdb.connect(str(path), read_only=read_only)


def latest_source_hash(path: Path) -> str | None:
    if not path.exists():
        return None
    with connect(path, read_only=True) as con:
        has = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'ingests'"
        ).fetchone()[0]
        if not has:
            return None
        row = con.execute("SELECT source_hash FROM ingests ORDER BY ingest_id DESC LIMIT 1").fetchone()
    return row[0] if row else None


def replace_dataset(path: Path, items: pl.DataFrame, interactions: pl.DataFrame,
                    source_hash: str, files: dict[str, str]) -> int:
    """Replace items and interactions and append an ingest record, all in one transaction."""
    with connect(path) as con:
        con.execute(INGESTS_DDL)
        con.register("new_items", items.to_arrow())
        con.register("new_interactions", interactions.to_arrow())
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("CREATE OR REPLACE TABLE items AS SELECT * FROM new_items ORDER BY item_id")
            con.execute(
                "CREATE OR REPLACE TABLE interactions AS SELECT * FROM new_interactions "
                "ORDER BY user_id, position"
            )
            next_id = con.execute("SELECT coalesce(max(ingest_id), 0) + 1 FROM ingests").fetchone()[0]
            con.execute(
                "INSERT INTO ingests VALUES (?, ?, ?, ?, ?, ?, ?)",
                [next_id, datetime.now(timezone.utc), source_hash, json.dumps(files, sort_keys=True),
                 interactions["user_id"].n_unique(), items.height, interactions.height],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return next_id


def read_table(path: Path, table: str) -> pl.DataFrame:
    if table not in {"items", "interactions", "ingests"}:
        raise ValueError(f"unknown table {table!r}")
    order = {"items": "item_id", "interactions": "user_id, position", "ingests": "ingest_id"}[table]
    with connect(path, read_only=True) as con:
        # DuckDB 2.0 dropped `.pl()` on the connection (execute() results); relations keep it.
        return con.sql(f"SELECT * FROM {table} ORDER BY {order}").pl()


def counts(path: Path) -> dict[str, int]:
    """Users, items and interactions, read back from the DuckDB tables."""
    with connect(path, read_only=True) as con:
        users, inter = con.execute("SELECT count(DISTINCT user_id), count(*) FROM interactions").fetchone()
        items = con.execute("SELECT count(*) FROM items").fetchone()[0]
    return {"users": int(users), "items": int(items), "interactions": int(inter)}
