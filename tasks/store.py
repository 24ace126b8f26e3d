"""The DuckDB interaction store: one file per dataset, `data/<dataset>/interactions.duckdb`.

Tables: `items` (item_id, source_item_id, title, description, brand, categories,
category, category_bucket, brand_bucket), `interactions` (user_id, source_user_id,
item_id, position, timestamp) and `ingests` (one row per ingest that changed the data:
source hash, file hashes, counts, time) and `exports` (one row per published version of the
ingest's files, `items.parquet` and `splits/`: the version and each file's sha256). A changed
source replaces `items` and `interactions`, appends to `ingests` and names the new files'
version in `exports`, all in one transaction; a failure rolls back and the previous content stays.

The store is the one pointer to the current version (docs/DESIGN.md, "Data"): the files of
version v are staged complete in `data/<dataset>/.staging-<v>/` before the transaction that names
v commits, and moved into place after it. `published_paths` is how readers find the files of the
version the store names, wherever the move stands.

`replace_dataset` stores frames already in memory; the streaming ingest (`format: parquet`)
opens the store with a memory limit and a spill folder (`connect`), and fills the tables with
SQL inside `transaction`, ending with `record_ingest`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, NamedTuple

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

EXPORTS_DDL = """
CREATE TABLE IF NOT EXISTS exports (
    export_id INTEGER PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL,
    version VARCHAR NOT NULL,
    files JSON NOT NULL
)
"""

# The ingest's files, relative to data/<dataset>/, and the manifest that names their version.
# The manifest is moved into place last, so it names v only once every file of v is there.
OUTPUTS = ("items.parquet", "splits/train.parquet", "splits/valid.parquet", "splits/test.parquet")
MANIFEST = "splits/MANIFEST.json"
STAGING = ".staging-"  # data/<dataset>/.staging-<version>/: a version's files before they are moved in


class Version(NamedTuple):
    """A version of the ingest's files: the sha256 of its manifest, and each file's sha256."""
    version: str
    files: dict[str, str]


def connect(path: Path, read_only: bool = False, memory_limit: str | None = None,
            temp_dir: Path | None = None) -> duckdb.DuckDBPyConnection:
    """Open the store; with `memory_limit` (e.g. "2GB") DuckDB spills to `temp_dir` beyond it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path), read_only=read_only)
    if memory_limit is not None:
        con.execute(f"SET memory_limit = '{memory_limit}'")  # validated by DataConfig
    if temp_dir is not None:
        temp_dir.mkdir(parents=True, exist_ok=True)
        con.execute(f"SET temp_directory = {sql_string(temp_dir)}")
    return con


def sql_string(value: str | Path) -> str:
    """A SQL string literal (for paths in statements that take no parameters, such as COPY)."""
    return "'" + str(value).replace("'", "''") + "'"


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT; any exception (KeyboardInterrupt included) rolls back and re-raises it."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException as exc:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error as rollback_error:
            # A failed COMMIT (a full disk: "Could not write file ...wal") has already ended the
            # transaction, so ROLLBACK fails too ("no transaction is active"): the first error is
            # the cause, and the one raised.
            exc.add_note(f"(ROLLBACK afterwards failed as well: {rollback_error})")
        raise


def create_items(con: duckdb.DuckDBPyConnection, items: pl.DataFrame) -> None:
    con.register("new_items", items.to_arrow())
    con.execute("CREATE OR REPLACE TABLE items AS SELECT * FROM new_items ORDER BY item_id")
    con.unregister("new_items")


def record_ingest(con: duckdb.DuckDBPyConnection, source_hash: str, files: dict[str, str],
                  n_users: int, n_items: int, n_interactions: int) -> int:
    """Append one row to `ingests` (inside the caller's transaction); return its id."""
    # fetchall, not fetchone: DuckDB 2.0 refuses new work while a result is unfinished.
    next_id = con.execute("SELECT coalesce(max(ingest_id), 0) + 1 FROM ingests").fetchall()[0][0]
    con.execute(
        "INSERT INTO ingests VALUES (?, ?, ?, ?, ?, ?, ?)",
        [next_id, datetime.now(timezone.utc), source_hash, json.dumps(files, sort_keys=True),
         n_users, n_items, n_interactions],
    )
    return next_id


def record_version(con: duckdb.DuckDBPyConnection, version: Version) -> bool:
    """Name `version` as the current one (inside the caller's transaction); no row when it already is."""
    con.execute(EXPORTS_DDL)
    if current_version(con) == version:
        return False
    next_id = con.execute("SELECT coalesce(max(export_id), 0) + 1 FROM exports").fetchall()[0][0]
    con.execute("INSERT INTO exports VALUES (?, ?, ?, ?)",
                [next_id, datetime.now(timezone.utc), version.version, json.dumps(version.files, sort_keys=True)])
    return True


def current_version(con: duckdb.DuckDBPyConnection) -> Version | None:
    """The version the store names, or None (no `exports` table: a store from before versions)."""
    has = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'exports'").fetchall()[0][0]
    if not has:
        return None
    rows = con.execute("SELECT version, files FROM exports ORDER BY export_id DESC LIMIT 1").fetchall()
    return Version(rows[0][0], json.loads(rows[0][1])) if rows else None


def published_version(path: Path) -> Version | None:
    if not path.exists():
        return None
    with connect(path, read_only=True) as con:
        return current_version(con)


def publish_version(path: Path, version: Version) -> bool:
    """Name `version` in its own transaction (an unchanged source whose files changed, e.g. max_history)."""
    with connect(path) as con, transaction(con):
        return record_version(con, version)


def published_paths(out_dir: Path) -> dict[str, Path]:
    """Where to read each of the ingest's files (`OUTPUTS`) in the version the store names.

    After an ingest stopped between its commit and the end of the move, the files not yet
    moved are still in `.staging-<v>/`: they are read from there, so a reader never pairs the
    store with older splits. Without a store, or with one from before versions, the files in
    place are read as they are. An ingest running beside a reader is out of scope (the stages
    that read run after it).
    """
    visible = {rel: out_dir / rel for rel in OUTPUTS}
    try:
        named = published_version(out_dir / "interactions.duckdb")
    except duckdb.IOException as exc:  # a writer holds the store
        raise RuntimeError(f"{out_dir / 'interactions.duckdb'}: cannot read the store ({exc}); is an ingest "
                           "running?") from exc
    if named is None:
        return visible
    staged = out_dir / f"{STAGING}{named.version}"
    if staged.is_dir():
        return {rel: staged / rel if (staged / rel).exists() else path for rel, path in visible.items()}
    manifest = out_dir / MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} is missing: the store names version {named.version[:12]}, whose "
                                "files are not in place; run the ingest")
    found = json.loads(manifest.read_text())["version"]
    if found != named.version:
        raise ValueError(f"{out_dir}: the files in place are version {found[:12]}, the store names "
                         f"{named.version[:12]}; run the ingest, which restores the named version")
    return visible


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
                    source_hash: str, files: dict[str, str], version: Version | None = None) -> int:
    """Replace items and interactions, append an ingest record and name `version` (the staged
    files of this data), all in one transaction."""
    with connect(path) as con:
        con.execute(INGESTS_DDL)
        con.register("new_interactions", interactions.to_arrow())
        with transaction(con):
            create_items(con, items)
            con.execute(
                "CREATE OR REPLACE TABLE interactions AS SELECT * FROM new_interactions "
                "ORDER BY user_id, position"
            )
            next_id = record_ingest(con, source_hash, files, interactions["user_id"].n_unique(),
                                    items.height, interactions.height)
            if version is not None:
                record_version(con, version)
    return next_id


def read_table(path: Path, table: str) -> pl.DataFrame:
    order = {"items": "item_id", "interactions": "user_id, position", "ingests": "ingest_id", "exports": "export_id"}
    if table not in order:
        raise ValueError(f"unknown table {table!r}")
    with connect(path, read_only=True) as con:
        # DuckDB 2.0 dropped `.pl()` on the connection (execute() results); relations keep it.
        return con.sql(f"SELECT * FROM {table} ORDER BY {order[table]}").pl()


def counts(path: Path) -> dict[str, int]:
    """Users, items and interactions, read back from the DuckDB tables."""
    with connect(path, read_only=True) as con:
        users, inter = con.execute("SELECT count(DISTINCT user_id), count(*) FROM interactions").fetchone()
        items = con.execute("SELECT count(*) FROM items").fetchone()[0]
    return {"users": int(users), "items": int(items), "interactions": int(inter)}
