"""Batch candidate dumps: the top-N items and scores of one method for the test users.

`data/<dataset>/candidates/` holds
- `part-00000.parquet`, ...: columns user_id (int64), rank (int32, 1-based), item_id (int64),
  score (float32); exactly `candidates.top_n` rows per user, sorted by user then rank, and
  `candidates.users_per_shard` users per shard in ascending user order. Ids are the dense ids
  of the splits: `items.parquet` maps item_id to source_item_id, the store's `interactions`
  table maps user_id to source_user_id.
- `part-00000.json`, ...: each shard's sidecar, written after its shard: sha256, rows, users
  and the dump's fingerprint (method, model files, test split, tokenizer, decoding params,
  the decoding code, torch and polars versions).
- `manifest.json`, written last: method (and `cf_weight`, tiger_cf's weight chosen on
  validation), dataset, model file sha256, params hash, rows and sha256 of every shard,
  creation time, top_n. No manifest means the dump is incomplete.

Histories are those of `splits/test.parquet` (the history before each user's test item).
Scores: summed log-probabilities of the beam (tiger), the merge score of two-pass decoding
(gc_sft, grc_sft, grc_rl), the logit (sasrec). Where the GRC merge leaves its list short, the
decoder fills it with the remaining drafts in draft order, scored -inf: they rank below every
scored item and are written with score -inf. With `data.exclude_history` a user's own history
items are never listed.

Resuming: a restarted run keeps a shard only when its bytes match its sidecar's sha256 and the
sidecar's fingerprint and user list match this run's; any other shard is decoded again. Each
shard is decoded on its own, in the same batches whether or not the run was interrupted, and
polars writes the same frame to the same bytes, so a resumed dump equals an uninterrupted one
byte for byte (the manifest differs only in its creation time).

Workers: with `candidates.workers` W >= 2 (or a `candidates.dask_address`) the shards still to
decode run as Prefect tasks (`dump_shard`) on Dask through prefect-dask's DaskTaskRunner: a
local cluster of W single-threaded worker processes, or an existing Dask cluster. Each worker
process loads the model once (cached by the dump's fingerprint) and decodes, gates and writes
whole shards; shards never share a file, so no coordination is needed beyond the manifest the
flow writes at the end. A shard's bytes depend on the torch thread count (`candidates.threads`)
but not on which process decoded it, so a sharded dump equals a single-process dump.

A user for whom the decode returns fewer than top_n items (padding, id -1: history exclusion
with a beam barely above top_n) stops the stage with an error naming the user, rather than a short list:
readers may rely on exactly top_n rows per user. Raise `candidates.beam`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import polars as pl
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from grc_core.device import resolve_device, set_threads
from tasks import io
from tasks.artifacts import (Ranker, check_ensemble, decode_config, load_ranker, load_split, model_files,
                             tiger_cf_weight)
from tasks.io import sha256_file
from tasks.params import Params, resolve_path
from tasks.quality import gx_expectations, run_gate
from tasks.stages import ITEM_ID_METHODS, fingerprint
from tasks.ui import champion_entry

MANIFEST = "manifest.json"
SCHEMA = {"user_id": pl.Int64, "rank": pl.Int32, "item_id": pl.Int64, "score": pl.Float32}


class Shard(NamedTuple):
    index: int
    name: str  # file stem: part-00000
    users: np.ndarray  # (U,) int64 user ids, ascending
    rows: np.ndarray  # (U,) int64 rows of splits/test.parquet


@dataclass(frozen=True)
class DumpPlan:
    method: str  # the method dumped: candidates.method, or the validation champion where that is auto
    chosen_by: dict | None  # with auto: the leaderboard's rule, users, champion metrics and margin
    cf_weight: float | None  # tiger_cf: the weight of SASRec's prefix value it decodes with (None for other methods)
    dataset: str
    top_n: int
    beam: int
    out_dir: Path
    n_items: int
    model_sha256: dict[str, str]  # path under data/<dataset>/ -> sha256
    input_sha256: dict[str, str]  # the test split, items and tokenizer files the decode reads
    params_hash: str
    fingerprint: str
    shards: tuple[Shard, ...]


def read_users_file(path: Path, known: np.ndarray) -> np.ndarray:
    """Ascending unique user ids listed in `path`: a Parquet file with a `user_id` column, or text
    with one id per line (blank lines, `#` comments and a `user_id` header line are skipped).

    Every id must be a user of the test split (`known`); a repeated id is an error too.
    """
    if not path.is_file():
        raise FileNotFoundError(f"candidates.users_file: {path} does not exist")
    if path.suffix == ".parquet":
        frame = io.read_parquet(path)
        if "user_id" not in frame.columns:
            raise ValueError(f"{path}: no column user_id (columns: {frame.columns})")
        col = frame["user_id"]
        if not col.dtype.is_integer():
            raise ValueError(f"{path}: field user_id: expected integers, got {col.dtype}")
        if col.null_count():
            raise ValueError(f"{path}: field user_id, row {int(col.is_null().arg_max())}: null")
        entries = [(f"row {i}", int(u)) for i, u in enumerate(col.to_list())]
    else:
        entries = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            text = line.split("#", 1)[0].strip()
            if not text or (not entries and text == "user_id"):
                continue
            try:
                entries.append((f"line {n}", int(text)))
            except ValueError:
                raise ValueError(f"{path}: line {n}: user_id {text!r} is not an integer") from None
    if not entries:
        raise ValueError(f"{path}: lists no user ids")
    known_set = set(known.tolist())
    seen: dict[int, str] = {}
    for where, user in entries:
        if user not in known_set:
            raise ValueError(f"{path}: {where}: user_id {user} is not a user of the test split")
        if user in seen:
            raise ValueError(f"{path}: {where}: user_id {user} repeats {seen[user]}")
        seen[user] = where
    return np.array(sorted(seen), dtype=np.int64)


def make_shards(users: np.ndarray, rows: np.ndarray, per_shard: int) -> tuple[Shard, ...]:
    """Users (ascending) in consecutive groups of `per_shard`; `rows[i]` is user i's test-split row."""
    return tuple(Shard(k, f"part-{k:05d}", users[s:s + per_shard], rows[s:s + per_shard])
                 for k, s in enumerate(range(0, len(users), per_shard)))


def users_digest(users: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(users, dtype=np.int64).tobytes()).hexdigest()


def dump_fingerprint(params: Params, method: str, files: dict[str, str], cf_weight: float | None = None) -> str:
    """What the bytes of a shard depend on, besides its users: the stage's params and code
    (tasks/stages.py), the method dumped (and tiger_cf's weight, chosen on validation), the files
    it reads, and the torch and polars versions."""
    extra = {"method": method, "versions": {"torch": torch.__version__, "polars": pl.__version__}}
    if cf_weight is not None:
        extra["cf_weight"] = cf_weight
    return fingerprint(params, "candidates", inputs=files, extra=extra)


def resolve_method(params: Params) -> tuple[str, dict | None]:
    """The method to dump and, for `candidates.method: auto`, why: the champion of the validation
    leaderboard that `evaluate` wrote (data/<dataset>/eval/leaderboard.json)."""
    method = params.candidates.method
    if method != "auto":
        return method, None
    path = params.dataset_dir() / "eval" / "leaderboard.json"
    if not path.is_file():
        raise FileNotFoundError(f"candidates.method=auto: {path} does not exist; run the evaluate stage first "
                                "(it ranks every method on the validation split), or name a method")
    board = io.read_json(path)
    chosen = {"rule": board["rule"], "split": board["split"], "users": board["users"],
              "champion_metrics": champion_entry(board)["metrics"], "runner_up": board.get("runner_up"),
              "margin": board.get("margin"), "default": board.get("default"),
              "leaderboard": {m["method"]: m["metrics"]["recall@10"] for m in board["methods"]}}
    return board["champion"], chosen


@task
def plan_dump(params: Params) -> DumpPlan:
    """Users, shards and the fingerprint of this dump; fails early on a missing model or a bad users file."""
    cd, out_dir = params.candidates, params.dataset_dir()
    method, chosen_by = resolve_method(params)
    cf_weight = tiger_cf_weight(out_dir, params.evaluate.cf_weights) if method == "tiger_cf" else None
    check_ensemble(out_dir, params.sasrec_ensemble.seeds, method)
    model_paths = list(model_files(method))
    input_paths = ["splits/test.parquet"]
    if method not in ITEM_ID_METHODS:
        input_paths += ["items.parquet", "tokenizer/semantic_ids.parquet", "tokenizer/tokenizer.json"]
    for rel in model_paths + input_paths:
        if not (out_dir / rel).is_file():
            raise FileNotFoundError(f"candidates.method={method}: {out_dir / rel} does not exist; "
                                    "run the stage that makes it first")
    model_sha = {rel: sha256_file(out_dir / rel) for rel in model_paths}
    input_sha = {rel: sha256_file(out_dir / rel) for rel in input_paths}
    test_users = io.read_parquet(out_dir / "splits" / "test.parquet", columns=["user_id"])["user_id"].to_numpy()
    users = (read_users_file(resolve_path(cd.users_file), test_users) if cd.users_file
             else np.unique(test_users))
    row_of = {int(u): i for i, u in enumerate(test_users)}
    rows = np.array([row_of[int(u)] for u in users], dtype=np.int64)
    if method in ITEM_ID_METHODS:
        n_items = int(json.loads((out_dir / "sasrec" / "config.json").read_text())["n_items"])
    else:
        n_items = io.parquet_rows(out_dir / "tokenizer" / "semantic_ids.parquet")
    return DumpPlan(method=method, chosen_by=chosen_by, cf_weight=cf_weight, dataset=params.data.dataset,
                    top_n=cd.top_n, beam=cd.beam,
                    out_dir=out_dir / "candidates", n_items=n_items, model_sha256=model_sha,
                    input_sha256=input_sha, params_hash=params.section_hash("data", "evaluate", "candidates"),
                    fingerprint=dump_fingerprint(params, method, {**model_sha, **input_sha}, cf_weight),
                    shards=make_shards(users.astype(np.int64), rows, cd.users_per_shard))


def start_dump(out_dir: Path) -> None:
    """A dump in progress has no manifest; temp files of a killed write are dropped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for tmp in out_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def current_shard(out_dir: Path, shard: Shard, fingerprint: str) -> dict | None:
    """The sidecar record of a shard this run may keep as it is, or None if it must be decoded."""
    path, side = out_dir / f"{shard.name}.parquet", out_dir / f"{shard.name}.json"
    if not (path.is_file() and side.is_file()):
        return None
    try:
        record = json.loads(side.read_text())
    except ValueError:
        return None
    if record.get("fingerprint") != fingerprint or record.get("users_sha256") != users_digest(shard.users):
        return None
    return record if sha256_file(path) == record.get("sha256") else None


def dump_ranker(params: Params, plan: DumpPlan) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The planned method's ranking of test-split rows: (U,) rows -> items, scores (U, W), best first."""
    cd, out_dir = params.candidates, params.dataset_dir()
    test = load_split(out_dir, "test", params.data.max_history)
    rank: Ranker = load_ranker(plan.method, out_dir, params.dataset.attributes, resolve_device(cd.device),
                               decode_config(params.evaluate, cd.beam, params.vstar.ved_test), cd.batch_size,
                               params.data.exclude_history, plan.cf_weight or 0.0)
    return lambda rows: rank(test.select(torch.as_tensor(rows, dtype=torch.long)))


_RANKERS: dict[str, Callable] = {}  # per process: the model of the dump in progress


def cached_ranker(params: Params, plan: DumpPlan) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The ranker of this dump, loaded once per (worker) process (keyed by the dump's fingerprint)."""
    if plan.fingerprint not in _RANKERS:
        _RANKERS.clear()
        _RANKERS[plan.fingerprint] = dump_ranker(params, plan)
    return _RANKERS[plan.fingerprint]


@task(cache_policy=NO_CACHE)
def dump_shard(params: Params, plan: DumpPlan, shard: Shard) -> dict:
    """Decode, gate and write one shard, in whatever process (a Dask worker) runs it."""
    set_threads(params.candidates.threads)
    frame = rank_shard.fn(cached_ranker(params, plan), shard, plan.top_n)
    gate_shard.fn(frame, len(shard.users), plan.top_n, plan.n_items, params.reports_dir(),
                  suite=f"candidates_{shard.name}")
    return write_shard.fn(plan.out_dir, shard, frame, plan.fingerprint)


def top_lists(users: np.ndarray, items: np.ndarray, scores: np.ndarray, top_n: int) -> pl.DataFrame:
    """(U,) users and their ranked (U, W) items and scores -> U * top_n rows of the dump schema.

    Padding (item -1) within the first top_n is an error naming the user.
    """
    width = items.shape[1]
    items, scores = items[:, :top_n], scores[:, :top_n]  # (U, top_n)
    real = items >= 0
    short = real.sum(1) < top_n
    if short.any():
        u = int(np.argmax(short))
        raise ValueError(f"candidates: user_id {int(users[u])} gets only {int(real[u].sum())} items from a "
                         f"ranking of width {width}, fewer than candidates.top_n={top_n} (its history items "
                         "are excluded); raise candidates.beam or lower candidates.top_n")
    return pl.DataFrame({
        "user_id": np.repeat(users, top_n), "rank": np.tile(np.arange(1, top_n + 1), len(users)),
        "item_id": items.reshape(-1), "score": scores.reshape(-1),
    }, schema=SCHEMA)


@task(cache_policy=NO_CACHE)  # the ranker holds a model: nothing worth hashing, nothing cached
def rank_shard(ranker: Ranker, shard: Shard, top_n: int) -> pl.DataFrame:
    items, scores = ranker(shard.rows)
    return top_lists(shard.users, items, scores, top_n)


def gate_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """Helper columns for the gate: score_step (score minus the previous rank's score; 0 at rank 1
    and between equal scores, -inf after -inf included) and user_rows (rows of that user)."""
    prev = pl.col("score").shift(1).over("user_id")
    return frame.sort("user_id", "rank").with_columns(
        pl.when(prev.is_null() | (pl.col("score") == prev)).then(0.0)
        .otherwise(pl.col("score") - prev).alias("score_step"),
        pl.len().over("user_id").alias("user_rows"),
    )


@task
def gate_shard(frame: pl.DataFrame, n_users: int, top_n: int, n_items: int, report_dir: Path | None,
               suite: str = "candidates") -> dict:
    """Exactly top_n rows per user with ranks 1..top_n, ids in the catalog, no item twice for a user,
    scores (no NaN or +inf; -inf for backfilled drafts) that never increase with rank."""
    gxe = gx_expectations()
    big = float(np.finfo(np.float32).max)
    checks = [
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in SCHEMA],
        gxe.ExpectColumnValuesToBeBetween(column="user_rows", min_value=top_n, max_value=top_n),
        gxe.ExpectColumnValuesToBeBetween(column="rank", min_value=1, max_value=top_n),
        gxe.ExpectColumnValuesToBeBetween(column="item_id", min_value=0, max_value=n_items - 1),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id"]),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "rank"]),
        gxe.ExpectColumnValuesToBeBetween(column="score", max_value=big),
        gxe.ExpectColumnValuesToBeBetween(column="score_step", max_value=0.0),
        gxe.ExpectTableRowCountToEqual(value=n_users * top_n),
    ]
    return run_gate(suite, gate_columns(frame), checks, report_dir)


@task(retries=2, retry_delay_seconds=2)
def write_shard(out_dir: Path, shard: Shard, frame: pl.DataFrame, fingerprint: str) -> dict:
    """The shard (atomically), then its sidecar: a sidecar always describes a complete shard."""
    path = out_dir / f"{shard.name}.parquet"
    io.write_parquet(path, frame)
    record = {"file": path.name, "users": len(shard.users), "rows": frame.height, "sha256": sha256_file(path),
              "first_user": int(shard.users[0]), "last_user": int(shard.users[-1]),
              "users_sha256": users_digest(shard.users), "fingerprint": fingerprint}
    io.write_json(out_dir / f"{shard.name}.json", record)
    return record


def remove_stale_shards(out_dir: Path, names: set[str]) -> list[str]:
    """Shards of an earlier, larger dump (more users, smaller shards) that this one does not have."""
    stale = sorted(p.name for p in out_dir.glob("part-*") if p.name.split(".")[0] not in names)
    for name in stale:
        (out_dir / name).unlink()
    return stale


@task(retries=2, retry_delay_seconds=2)
def write_manifest(plan: DumpPlan, records: list[dict]) -> dict:
    manifest = {
        "method": plan.method, "chosen_by": plan.chosen_by, "cf_weight": plan.cf_weight, "dataset": plan.dataset,
        "top_n": plan.top_n, "beam": plan.beam,
        "users": sum(r["users"] for r in records), "rows": sum(r["rows"] for r in records),
        "columns": {k: str(v) for k, v in SCHEMA.items()},
        "model_sha256": plan.model_sha256, "input_sha256": plan.input_sha256,
        "params_hash": plan.params_hash, "params_sections": ["data", "evaluate", "candidates"],
        "fingerprint": plan.fingerprint,
        "shards": [{k: r[k] for k in ("file", "users", "rows", "sha256", "first_user", "last_user")}
                   for r in records],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    io.write_json(plan.out_dir / MANIFEST, manifest)
    return manifest
