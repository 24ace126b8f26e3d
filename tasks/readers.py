"""Readers for the input formats: LC-Rec JSON, RecBole atomic files and Parquet.

LC-Rec and RecBole return a `RawDataset` of polars frames with dense ids (`item_id` 0..N-1,
`user_id` 0..U-1, assigned in the numeric order of the source ids where they are integers,
otherwise lexicographic), so a re-ingest of the same source gives the same ids.
Every problem with the input raises `InputError` naming the file, the field and the
row (the JSON key or the line), before anything is written anywhere.

Parquet (`open_parquet_source`) is not read into memory: it becomes a DuckDB view over
`interactions/**/*.parquet` that the streaming ingest (tasks/ingest.py) consumes in SQL. Its
rows are checked in SQL and a bad one is named by DuckDB's `filename` and `file_row_number`.
Only the item catalog (`items.parquet`, or the distinct item ids) is built in memory, with
the same id rule as above.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from tasks.io import sha256_file
from tasks.store import sql_string

TEXT_FIELDS = ("title", "description", "brand", "categories")
# \Z, not $: "$" also matches before a trailing newline, so "3\n" would pass as user 3.
_INT_KEY = re.compile(r"^(0|[1-9][0-9]*)\Z")
# The RecBole reader's own columns (row number, timestamp parsing). A header field is the part of
# `name:type` before the colon, so no field of the file can take these names.
_LINE, _TS_FRACTION = ":line", ":ts_fraction"


class InputError(ValueError):
    """Malformed source data; the message names the file, the field and the row."""


@dataclass
class RawDataset:
    # item_id, source_item_id, title, description, brand, categories, category[, prebuilt_code]
    items: pl.DataFrame
    interactions: pl.DataFrame  # user_id, source_user_id, item_id, position, timestamp
    source_files: dict[str, str] = field(default_factory=dict)  # path -> sha256


class _Object(dict):
    duplicate: str | None = None


def _wide_encoding(data: bytes) -> str | None:
    """The encoding ("UTF-16" or "UTF-32") the bytes start like, or None: by the byte order mark,
    or by NUL bytes among the first four (the first characters are ASCII: RFC 4627, section 3)."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "UTF-32"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16"
    head = data[:4]
    if head.count(0) >= 3 and len(head) == 4:
        return "UTF-32"
    return "UTF-16" if 0 in head else None


def _load_json(path: Path) -> Any:
    """Parse JSON strictly: empty files, truncation, duplicate keys and bad UTF-8 are errors."""
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"{path}: file is empty")
    wide = _wide_encoding(data)
    if wide:
        raise InputError(f"{path}: not UTF-8 JSON (it looks like {wide}); JSON files must be UTF-8: "
                         f"re-encode it, e.g. iconv -f {wide} -t UTF-8")
    data = data.removeprefix(codecs.BOM_UTF8)  # RFC 8259 lets a parser ignore it; json.loads does not

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Inner objects are built first and know nothing of their key: they remember a
        # duplicate, and the enclosing object reports it with its own key (the row).
        out = _Object()
        for k, v in pairs:
            if isinstance(v, _Object) and v.duplicate is not None:
                raise InputError(f"{path}: key {k!r}, field {v.duplicate!r}: duplicate key")
            if k in out:
                out.duplicate = out.duplicate or k
            out[k] = v
        return out

    # surrogateescape keeps undecodable bytes as lone surrogates, so we can say which
    # row and field hold them instead of only a byte offset.
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        loaded = json.loads(text, object_pairs_hook=no_duplicates)
        if isinstance(loaded, _Object) and loaded.duplicate is not None:
            raise InputError(f"{path}: key {loaded.duplicate!r}: duplicate key")
        return loaded
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); "
            "the file may be truncated or malformed"
        ) from None
    except RecursionError:
        # json.loads recurses once per nesting level; a source file nests a handful of levels.
        raise InputError(f"{path}: invalid JSON (arrays or objects nested too deeply); the file is malformed") from None


def _check_text(path: Path, row: str, name: str, value: Any, required: bool) -> str | None:
    if value is None:
        if required:
            raise InputError(f"{path}: item {row!r}, field {name!r}: missing")
        return None
    if not isinstance(value, str):
        raise InputError(f"{path}: item {row!r}, field {name!r}: expected a string, got {'dict' if isinstance(value, dict) else type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{path}: item {row!r}, field {name!r}: bytes that are not valid UTF-8") from None
    return value


def _int_key(path: Path, key: str, what: str) -> int:
    if not _INT_KEY.match(key):
        raise InputError(f"{path}: {what} {key!r}: id must be a non-negative integer")
    return int(key)


def leaf_category(path_text: str | None) -> str | None:
    if not path_text:
        return None
    parts = [p.strip() for p in path_text.split(",") if p.strip()]
    return parts[-1] if parts else None


def read_lcrec(root: Path, prefix: str, index: str = "") -> RawDataset:
    """Read `<prefix>.inter.json`, optional `<prefix>.item.json` and an optional index file."""
    inter_path = root / f"{prefix}.inter.json"
    item_path = root / f"{prefix}.item.json"
    if not inter_path.exists():
        raise InputError(f"{inter_path}: interactions file not found")
    files = {str(inter_path): sha256_file(inter_path)}

    inter = _load_json(inter_path)
    if not isinstance(inter, dict):
        raise InputError(f"{inter_path}: top level must be an object of user_id -> [item_id, ...]")
    if not inter:
        raise InputError(f"{inter_path}: no users")

    items_raw: dict[int, dict[str, Any]] | None = None
    if item_path.exists():
        files[str(item_path)] = sha256_file(item_path)
        loaded = _load_json(item_path)
        if not isinstance(loaded, dict) or not loaded:
            raise InputError(f"{item_path}: top level must be a non-empty object of item_id -> fields")
        items_raw = {}
        for key, rec in loaded.items():
            iid = _int_key(item_path, key, "item")
            if not isinstance(rec, dict):
                raise InputError(f"{item_path}: item {key!r}: expected an object of fields")
            items_raw[iid] = {
                name: _check_text(item_path, key, name, rec.get(name), required=(name == "title"))
                for name in TEXT_FIELDS
            }

    codes_raw: dict[int, list[str]] | None = None
    if index:
        index_path = root / index
        if not index_path.exists():
            raise InputError(f"{index_path}: index file not found")
        files[str(index_path)] = sha256_file(index_path)
        loaded = _load_json(index_path)
        if not isinstance(loaded, dict):
            raise InputError(f"{index_path}: top level must be an object of item_id -> [code, ...]")
        codes_raw = {}
        for key, tokens in loaded.items():
            iid = _int_key(index_path, key, "item")
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
                raise InputError(f"{index_path}: item {key!r}: expected a non-empty list of code strings")
            for t in tokens:
                _check_text(index_path, key, "code", t, required=True)
            codes_raw[iid] = tokens

    users, user_items = [], []
    for key, seq in inter.items():
        uid = _int_key(inter_path, key, "user")
        if not isinstance(seq, list):
            raise InputError(f"{inter_path}: user {key!r}: expected a list of item ids")
        if not seq:
            raise InputError(f"{inter_path}: user {key!r}: empty sequence")
        for pos, iid in enumerate(seq):
            if isinstance(iid, bool) or not isinstance(iid, int):
                raise InputError(f"{inter_path}: user {key!r}, position {pos}: item id {iid!r} is not an integer")
            if iid < 0:
                raise InputError(f"{inter_path}: user {key!r}, position {pos}: item id {iid} is negative")
            if items_raw is not None and iid not in items_raw:
                raise InputError(
                    f"{inter_path}: user {key!r}, position {pos}: item {iid} is not in {item_path.name}"
                )
            if codes_raw is not None and iid not in codes_raw:
                raise InputError(
                    f"{inter_path}: user {key!r}, position {pos}: item {iid} has no semantic ID in {index}"
                )
        users.append(uid)
        user_items.append(seq)

    if items_raw is not None:
        source_items = sorted(items_raw)
    else:
        known = set(codes_raw) if codes_raw is not None else set()
        for seq in user_items:
            known.update(seq)
        source_items = sorted(known)
    dense = {src: i for i, src in enumerate(source_items)}

    def text_col(name: str) -> list[str | None]:
        if items_raw is None:
            return [None] * len(source_items)
        return [items_raw[s][name] for s in source_items]

    categories = text_col("categories")
    items = pl.DataFrame(
        {
            "item_id": list(range(len(source_items))),
            "source_item_id": [str(s) for s in source_items],
            "title": text_col("title"),
            "description": text_col("description"),
            "brand": [b.strip() or None if b is not None else None for b in text_col("brand")],
            "categories": categories,
            "category": [leaf_category(c) for c in categories],
        },
        schema={
            "item_id": pl.Int64, "source_item_id": pl.String, "title": pl.String,
            "description": pl.String, "brand": pl.String, "categories": pl.String, "category": pl.String,
        },
    )

    order = sorted(range(len(users)), key=lambda i: users[i])
    rows_user, rows_src, rows_item, rows_pos = [], [], [], []
    for dense_uid, i in enumerate(order):
        seq = user_items[i]
        rows_user.extend([dense_uid] * len(seq))
        rows_src.extend([str(users[i])] * len(seq))
        rows_item.extend(dense[s] for s in seq)
        rows_pos.extend(range(len(seq)))
    interactions = pl.DataFrame(
        {"user_id": rows_user, "source_user_id": rows_src, "item_id": rows_item,
         "position": rows_pos, "timestamp": [None] * len(rows_user)},
        schema={"user_id": pl.Int64, "source_user_id": pl.String, "item_id": pl.Int64,
                "position": pl.Int64, "timestamp": pl.Int64},
    )
    if codes_raw is not None:
        missing = [s for s in source_items if s not in codes_raw]
        if missing:
            raise InputError(f"{root / index}: item {missing[0]!r}: no semantic ID ({len(missing)} items lack one)")
        items = items.with_columns(
            pl.Series("prebuilt_code", [codes_raw[s] for s in source_items], dtype=pl.List(pl.String))
        )
    return RawDataset(items=items, interactions=interactions, source_files=files)


def _read_atomic(path: Path) -> pl.DataFrame:
    """A RecBole atomic file: tab-separated, header `name:type`, read as strings, with the line
    number of each row in column `_LINE`."""
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"{path}: file is empty")
    wide = _wide_encoding(data)
    if wide:
        raise InputError(f"{path}: not UTF-8 (it looks like {wide}): re-encode it, e.g. iconv -f {wide} -t UTF-8")
    try:
        # Spreadsheet tools write a BOM; left in, it would become part of the first field's name.
        text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: bytes that are not valid UTF-8") from None
    # Not splitlines(): it also breaks at \x1c-\x1e, \x85 and U+2028/9, which may sit inside a field.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    header = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    first_column: dict[str, int] = {}
    for col, name in enumerate(header, start=1):
        if name in first_column:
            raise InputError(f"{path}: line 1, field {name!r}: in the header twice "
                             f"(columns {first_column[name]} and {col})")
        first_column[name] = col
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise InputError(f"{path}: line {n}: expected {len(header)} tab-separated fields, got {len(cells)}")
        rows.append(cells)
    if not rows:
        raise InputError(f"{path}: no data rows")
    return pl.DataFrame(rows, schema=header, orient="row").with_row_index(_LINE, offset=2)


def _dense_ids(values: list[str]) -> dict[str, int]:
    uniq = set(values)
    key = (lambda s: (0, int(s), s)) if all(_INT_KEY.match(v) for v in uniq) else (lambda s: (1, 0, s))
    return {v: i for i, v in enumerate(sorted(uniq, key=key))}


def read_recbole(root: Path, prefix: str) -> RawDataset:
    """Read `<prefix>.inter` (user_id, item_id, timestamp) and optional `<prefix>.item`."""
    inter_path = root / f"{prefix}.inter"
    item_path = root / f"{prefix}.item"
    if not inter_path.exists():
        raise InputError(f"{inter_path}: interactions file not found")
    files = {str(inter_path): sha256_file(inter_path)}
    inter = _read_atomic(inter_path)
    for col in ("user_id", "item_id"):
        if col not in inter.columns:
            raise InputError(f"{inter_path}: field {col!r}: missing from the header")
        bad = inter.filter(pl.col(col).str.strip_chars() == "")
        if bad.height:
            raise InputError(f"{inter_path}: line {bad[_LINE][0]}, field {col!r}: empty id")
    if "timestamp" in inter.columns:
        inter = _parse_timestamps(inter_path, inter)
    else:
        inter = inter.with_columns(pl.lit(None, dtype=pl.Int64).alias("timestamp"),
                                   pl.lit(None, dtype=pl.Float64).alias(_TS_FRACTION))

    item_fields: dict[str, dict[str, str | None]] = {}
    if item_path.exists():
        files[str(item_path)] = sha256_file(item_path)
        items_frame = _read_atomic(item_path)
        if "item_id" not in items_frame.columns:
            raise InputError(f"{item_path}: field 'item_id': missing from the header")
        title_col = next((c for c in ("title", "movie_title", "name") if c in items_frame.columns), None)
        if title_col is None:
            raise InputError(f"{item_path}: field 'title': no title, movie_title or name column")
        genre_col = next((c for c in ("categories", "class", "genre") if c in items_frame.columns), None)
        brand_col = "brand" if "brand" in items_frame.columns else None
        for rec in items_frame.iter_rows(named=True):
            iid = rec["item_id"]
            if iid in item_fields:
                raise InputError(f"{item_path}: line {rec[_LINE]}, field 'item_id': duplicate item {iid!r}")
            genres = rec[genre_col].split() if genre_col and rec[genre_col] else []
            item_fields[iid] = {
                "title": rec[title_col].strip() or None,
                "description": None,
                "brand": (rec[brand_col].strip() or None) if brand_col else None,
                "categories": ",".join(genres) or None,
                # MovieLens genres are unordered tags: the first listed one stands in for a leaf.
                "category": genres[0] if genres else None,
            }
        unknown = inter.filter(~pl.col("item_id").is_in(list(item_fields)))
        if unknown.height:
            raise InputError(f"{inter_path}: line {unknown[_LINE][0]}, field 'item_id': "
                             f"item {unknown['item_id'][0]!r} is not in {item_path.name}")

    item_ids = _dense_ids(list(item_fields) or inter["item_id"].to_list())
    user_ids = _dense_ids(inter["user_id"].to_list())
    src_items = sorted(item_ids, key=item_ids.get)
    empty = {"title": None, "description": None, "brand": None, "categories": None, "category": None}
    items = pl.DataFrame(
        {
            "item_id": list(range(len(src_items))),
            "source_item_id": src_items,
            **{k: [item_fields.get(s, empty)[k] for s in src_items]
               for k in ("title", "description", "brand", "categories", "category")},
        },
        schema={"item_id": pl.Int64, "source_item_id": pl.String, "title": pl.String, "description": pl.String,
                "brand": pl.String, "categories": pl.String, "category": pl.String},
    )
    interactions = (
        inter.with_columns(
            pl.col("user_id").replace_strict(user_ids, return_dtype=pl.Int64).alias("uid"),
            pl.col("item_id").replace_strict(item_ids, return_dtype=pl.Int64).alias("iid"),
        )
        # Chronological per user by the exact value (whole part, then fraction); ties keep file order.
        .sort(["uid", "timestamp", _TS_FRACTION, _LINE], nulls_last=True)
        .select(
            pl.col("uid").alias("user_id"),
            pl.col("user_id").alias("source_user_id"),
            pl.col("iid").alias("item_id"),
            pl.int_range(pl.len()).over("uid").cast(pl.Int64).alias("position"),
            pl.col("timestamp"),
        )
    )
    return RawDataset(items=items, interactions=interactions, source_files=files)


def _parse_timestamps(path: Path, inter: pl.DataFrame) -> pl.DataFrame:
    """`timestamp` as Int64 (integers exactly, fractions truncated toward zero, as stored before)
    plus `_TS_FRACTION`, the part truncated: (timestamp, fraction) sorts like the value itself,
    where the truncated integer alone made 100.9 and 100.1 a tie. Fractional values compare at
    float64 precision, integers exactly (nanoseconds exceed float64's 2**53)."""
    raw = pl.col("timestamp")
    parsed = inter.with_columns(raw.str.contains(r"^[+-]?[0-9]+$").alias(":is_int"),
                                raw.str.to_integer(strict=False).alias(":as_int"),
                                raw.cast(pl.Float64, strict=False).alias(":as_float"))
    is_int, as_int, value = pl.col(":is_int"), pl.col(":as_int"), pl.col(":as_float")

    def first_bad(condition: pl.Expr, problem: str) -> None:
        bad = parsed.filter(condition)
        if bad.height:
            raise InputError(f"{path}: line {bad[_LINE][0]}, field 'timestamp': {bad['timestamp'][0]!r} {problem}")

    first_bad(value.is_null() | value.is_nan() | value.is_infinite(), "is not a number")  # "nan", "inf" parse
    first_bad(pl.when(is_int).then(as_int.is_null()).otherwise(~value.is_between(-(2.0 ** 63), 2.0 ** 63,
                                                                                 closed="left")),
              "is out of range (timestamps are stored as 64-bit integers)")
    # strict=False: the cast may also run on the integer rows, where 2**63 - 1 is the float 2**63.
    whole = pl.when(is_int).then(as_int).otherwise(value.cast(pl.Int64, strict=False))  # truncates
    return parsed.with_columns(whole.alias("timestamp")).with_columns(
        pl.when(is_int).then(0.0).otherwise(value - pl.col("timestamp").cast(pl.Float64)).alias(_TS_FRACTION)
    ).drop(":is_int", ":as_int", ":as_float")


# The same rule as _INT_KEY, for DuckDB's regexp_full_match.
_INT_KEY_SQL = "'0|[1-9][0-9]*'"
_ID_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
             "UBIGINT", "UHUGEINT", "VARCHAR")
_FLOAT_TYPES = ("FLOAT", "DOUBLE")


@dataclass
class ParquetSource:
    """The checked Parquet source: DuckDB temp view `source_interactions` (user_key, item_key,
    ts (sort key), timestamp (BIGINT), filename, file_row_number) and temp table `item_map`
    (item_key, item_id) live on the connection; the item catalog is in memory."""

    items: pl.DataFrame  # item_id, source_item_id, title, description, brand, categories, category
    source_files: dict[str, str]


def parquet_files(root: Path) -> list[Path]:
    folder = root / "interactions"
    files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise InputError(f"{folder}: no Parquet files (expected interactions/**/*.parquet)")
    return files


def parquet_source_files(root: Path) -> dict[str, str]:
    """path -> sha256 of every interactions file and of items.parquet where present."""
    paths = parquet_files(root) + ([root / "items.parquet"] if (root / "items.parquet").exists() else [])
    return {str(p): sha256_file(p) for p in paths}


def dense_order(con: duckdb.DuckDBPyConnection, keys_sql: str, key: str) -> str:
    """ORDER BY clause giving `_dense_ids`'s order: numeric if every key is an integer, else lexicographic."""
    all_int = con.execute(f"SELECT coalesce(bool_and(regexp_full_match({key}, {_INT_KEY_SQL})), true) "
                          f"FROM ({keys_sql})").fetchall()[0][0]
    # For canonical non-negative integers numeric order is (length, text): no cast that could overflow.
    return f"length({key}), {key}" if all_int else key


def _first_bad_row(con: duckdb.DuckDBPyConnection, relation: str, checks: list[tuple[str, str, str]]) -> None:
    """Raise InputError for the first row (by file, then row) failing any (field, condition, problem)."""
    cases = " ".join(f"WHEN {cond} THEN {i}" for i, (_, cond, _) in enumerate(checks))
    row = con.execute(
        f"SELECT filename, file_row_number, CASE {cases} END FROM {relation} "
        f"WHERE {' OR '.join(f'({cond})' for _, cond, _ in checks)} ORDER BY filename, file_row_number LIMIT 1"
    ).fetchall()
    if row:
        row = row[0]
        field_name, _, problem = checks[row[2]]
        raise InputError(f"{row[0]}: row {row[1]} (counting from 0), field {field_name!r}: {problem}")


def _types(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    return {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}


def open_parquet_source(con: duckdb.DuckDBPyConnection, root: Path, hive_partitioning: bool,
                        only: list[Path] | None = None) -> ParquetSource:
    """Check `<root>/interactions/**/*.parquet` and `<root>/items.parquet` in SQL; set up the views.

    `only`: the view reads just these interaction files (the new partitions of an append); the
    item catalog is still the whole source's.
    """
    files = parquet_source_files(root)
    pattern = (root / "interactions").as_posix() + "/**/*.parquet"
    read = (sql_string(pattern) if only is None
            else "[" + ", ".join(sql_string(Path(p).as_posix()) for p in only) + "]")
    raw = (f"read_parquet({read}, union_by_name = true, filename = true, "
           f"file_row_number = true, hive_partitioning = {str(hive_partitioning).lower()})")
    try:
        types_ = _types(con, raw)
    except duckdb.Error as exc:
        raise InputError(f"{pattern}: cannot be read as Parquet: {exc}") from None
    time_types = _ID_TYPES[:-1] + _FLOAT_TYPES + ("DATE", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE")
    for col, allowed in (("user_id", _ID_TYPES), ("item_id", _ID_TYPES), ("timestamp", time_types)):
        if col not in types_:
            raise InputError(f"{pattern}: field {col!r}: missing from every file")
        if types_[col] not in allowed:
            raise InputError(f"{pattern}: field {col!r}: type {types_[col]} (expected one of {', '.join(allowed)})")
    ts_type = types_["timestamp"]
    stored_ts = "epoch(timestamp)::BIGINT" if ts_type.startswith(("DATE", "TIMESTAMP")) else "timestamp::BIGINT"
    con.execute(
        "CREATE OR REPLACE TEMP VIEW source_interactions AS SELECT CAST(user_id AS VARCHAR) AS user_key, "
        f"CAST(item_id AS VARCHAR) AS item_key, timestamp AS ts, {stored_ts} AS timestamp, filename, "
        f"file_row_number FROM {raw}"
    )
    checks = [("user_id", "user_key IS NULL", "null"), ("item_id", "item_key IS NULL", "null"),
              ("timestamp", "ts IS NULL", "null"),
              ("user_id", "trim(user_key) = ''", "empty id"), ("item_id", "trim(item_key) = ''", "empty id")]
    if ts_type in _FLOAT_TYPES:
        checks.append(("timestamp", "NOT isfinite(ts)", "not a finite number"))
    try:
        _first_bad_row(con, "source_interactions", checks)
    except duckdb.Error as exc:
        raise InputError(f"{pattern}: {exc}") from None

    items_path = root / "items.parquet"
    items = _parquet_items(con, items_path) if items_path.exists() else _items_from_interactions(con)
    con.register("catalog", items.select("source_item_id", "item_id").to_arrow())
    con.execute("CREATE OR REPLACE TEMP TABLE item_map AS "
                "SELECT source_item_id AS item_key, item_id FROM catalog")
    con.unregister("catalog")
    if items_path.exists():
        unknown = con.execute("SELECT filename, file_row_number, item_key FROM source_interactions "
                              "ANTI JOIN item_map USING (item_key) "
                              "ORDER BY filename, file_row_number LIMIT 1").fetchall()
        if unknown:
            unknown = unknown[0]
            raise InputError(f"{unknown[0]}: row {unknown[1]} (counting from 0), field 'item_id': "
                             f"item {unknown[2]!r} is not in {items_path.name}")
    return ParquetSource(items=items, source_files=files)


def _items_from_interactions(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    keys = "SELECT DISTINCT item_key FROM source_interactions"
    order = dense_order(con, keys, "item_key")
    frame = con.sql(f"SELECT item_key AS source_item_id FROM ({keys}) ORDER BY {order}").pl()
    return frame.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("item_id"), "source_item_id",
        *[pl.lit(None, dtype=pl.String).alias(c) for c in ("title", "description", "brand", "categories", "category")],
    )


def _parquet_items(con: duckdb.DuckDBPyConnection, path: Path) -> pl.DataFrame:
    """items.parquet: item_id (int or string), optional title, description, brand and categories
    (a comma-separated path, or a list of strings joined with commas)."""
    relation = f"read_parquet({sql_string(path.as_posix())}, filename = true, file_row_number = true)"
    try:
        types_ = _types(con, relation)
    except duckdb.Error as exc:
        raise InputError(f"{path}: cannot be read as Parquet: {exc}") from None
    if "item_id" not in types_:
        raise InputError(f"{path}: field 'item_id': missing")
    if types_["item_id"] not in _ID_TYPES:
        raise InputError(f"{path}: field 'item_id': type {types_['item_id']} (expected an integer or a string)")
    text = []
    for name in TEXT_FIELDS:
        kind = types_.get(name)
        if kind is None:
            text.append(f"NULL::VARCHAR AS {name}")
        elif kind == "VARCHAR":
            text.append(name)
        elif name == "categories" and kind == "VARCHAR[]":
            text.append("array_to_string(categories, ',') AS categories")
        else:
            raise InputError(f"{path}: field {name!r}: type {kind} (expected a string)")
    view = (f"(SELECT CAST(item_id AS VARCHAR) AS item_key, {', '.join(text)}, filename, file_row_number "
            f"FROM {relation})")
    _first_bad_row(con, view, [("item_id", "item_key IS NULL", "null"), ("item_id", "trim(item_key) = ''", "empty id")])
    _first_bad_row(con, f"(SELECT *, count(*) OVER (PARTITION BY item_key) AS k, row_number() OVER "
                        f"(PARTITION BY item_key ORDER BY file_row_number) AS r FROM {view})",
                   [("item_id", "k > 1 AND r = 2", "duplicate item")])
    order = dense_order(con, f"SELECT item_key FROM {view}", "item_key")
    frame = con.sql(f"SELECT item_key AS source_item_id, {', '.join(TEXT_FIELDS)} FROM {view} ORDER BY {order}").pl()
    brand = pl.col("brand").str.strip_chars()
    return frame.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("item_id"), "source_item_id", "title", "description",
        pl.when(brand == "").then(None).otherwise(brand).alias("brand"), "categories",
        # leaf_category as an expression: the last non-blank comma-separated part.
        pl.col("categories").str.split(",").list.eval(pl.element().str.strip_chars())
        .list.eval(pl.element().filter(pl.element() != "")).list.last().alias("category"),
    )
