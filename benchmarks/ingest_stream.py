"""Streaming ingest (format: parquet) of a log larger than its memory limit: wall time, rows/s
and peak RSS, against the in-memory polars path on a smaller log.

    python -m benchmarks.ingest_stream [--users 1000000] [--per-user 20] [--items 200000]
        [--memory-limit 1GB,512MB] [--compare-users 100000]

Writes a synthetic hive-partitioned log (`interactions/day=<d>/chunk-<c>.parquet`, generated
`--chunk-users` users at a time, so generation stays in bounded memory) and `items.parquet`
into a scratch folder. Each measured run is a fresh subprocess (`--worker`), so its peak RSS
(ru_maxrss, and the largest VmRSS sampled every 0.2 s from /proc/self/status; DuckDB
allocates outside Python, so RSS is the measure) is its own:
  - stream at the full size (`ingest_parquet`: store + gates + splits), once per DuckDB
    memory_limit in `--memory-limit` (comma-separated), in a fresh output folder each time,
  - stream (under the first limit) and polars (RecBole atomic files of the same interactions: read_recbole,
    build_splits, gate_raw, gate_splits, stage_tables, commit_and_publish) at `--compare-users`;
    the two must give identical splits, which the benchmark checks.
Writes benchmarks/results/ingest_stream[_<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl

from tasks.env import PROJECT_ROOT

DAYS = 7


def generate(root: Path, users: int, per_user: int, items: int, chunk_users: int, seed: int,
             recbole: bool) -> dict:
    """Users 0..users-1 with `per_user` interactions each; items Zipf-like over `items`; each
    user's timestamps increase, and its interactions are spread over the day partitions."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    inter_dir = root / "interactions"
    for d in range(DAYS):
        (inter_dir / f"day={d}").mkdir(parents=True, exist_ok=True)
    # Zipf-like popularity without a dense CDF per draw: item = floor(items * u^2).
    inter_file = open(root / "bench.inter", "w") if recbole else None
    if inter_file:
        inter_file.write("user_id:token\titem_id:token\ttimestamp:float\n")
    for c, start in enumerate(range(0, users, chunk_users)):
        n = min(chunk_users, users - start)
        user = np.repeat(np.arange(start, start + n, dtype=np.int64), per_user)  # (n * per_user,)
        item = np.minimum((items * rng.random(n * per_user) ** 2).astype(np.int64), items - 1)
        step = rng.integers(1, 3600, size=(n, per_user)).cumsum(axis=1)  # strictly increasing per user
        ts = (1_600_000_000 + rng.integers(0, 10_000_000, size=(n, 1)) + step).reshape(-1)
        day = (ts // 86_400) % DAYS
        frame = pl.DataFrame({"user_id": user, "item_id": item, "timestamp": ts, "day": day})
        for d, part in frame.partition_by("day", as_dict=True).items():
            part.drop("day").write_parquet(inter_dir / f"day={d[0]}" / f"chunk-{c:04d}.parquet")
        if inter_file:
            frame.drop("day").write_csv(inter_file, separator="\t", include_header=False)
        del frame, user, item, ts, day, step
    if inter_file:
        inter_file.close()
    catalog = pl.DataFrame({"item_id": np.arange(items, dtype=np.int64)}).with_columns(
        pl.format("item {}", "item_id").alias("title"),
        pl.format("Brand{}", pl.col("item_id") % 97).alias("brand"),
        pl.format("Lab,Cat{}", pl.col("item_id") % 31).alias("categories"))
    catalog.write_parquet(root / "items.parquet")
    if recbole:
        catalog.select("item_id", "title", pl.col("categories").str.replace_all(",", " ")).write_csv(
            root / "bench.item", separator="\t", include_header=True)
        lines = (root / "bench.item").read_text().split("\n", 1)
        (root / "bench.item").write_text("item_id:token\ttitle:token_seq\tcategories:token_seq\n" + lines[1])
    return {"generate_s": round(time.perf_counter() - t0, 1), "source_parquet_mib": round(du(inter_dir) / 2**20, 1),
            "files": sum(1 for _ in inter_dir.rglob("*.parquet"))}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def vm(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """Largest VmRSS and largest size of the DuckDB spill folder, every `every` seconds."""

    def __init__(self, spill: Path, every: float = 0.2):
        super().__init__(daemon=True)
        self.spill, self.every, self.max_rss_kib, self.max_spill = spill, every, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.max_rss_kib = max(self.max_rss_kib, vm("VmRSS"))
            try:
                self.max_spill = max(self.max_spill, du(self.spill))
            except OSError:  # files come and go while DuckDB spills
                pass
            self.stop.wait(self.every)


def worker(path: str, root: Path, out: Path, memory_limit: str, max_history: int) -> dict:
    """One measured ingest in this process; returns its figures."""
    from tasks.ingest import (build_splits, commit_and_publish, gate_raw, gate_splits, ingest_parquet, read_source,
                              source_hash, stage_tables, with_buckets)

    def body(fn):  # the plain function under a Prefect task
        return getattr(fn, "fn", fn)
    from tasks.params import load_params
    from tasks.quality import _context

    fmt = "parquet" if path == "stream" else "recbole"
    spec = {"format": fmt, "path": str(root), "prefix": "bench", "attributes": ["category", "brand"]}
    params = load_params(overrides=[f"data.data_dir={json.dumps(str(out / 'data'))}",
                                    f"data.reports_dir={json.dumps(str(out / 'reports'))}", "data.dataset=bench",
                                    f"datasets.bench={json.dumps(spec)}", f"data.ingest_memory_limit={memory_limit}",
                                    f"data.max_history={max_history}"])
    _context()  # Great Expectations' import and context: outside the timed part, inside the baseline
    out_dir, report_dir = params.dataset_dir(), params.reports_dir()
    db = out_dir / "interactions.duckdb"
    baseline_kib = vm("VmRSS")
    sampler = Sampler(out_dir / ".duckdb_tmp")
    sampler.start()
    t0 = time.perf_counter()
    h = source_hash(params.dataset, params)
    if path == "stream":
        res = ingest_parquet.fn(params.dataset, params, db, out_dir, report_dir, h)
        n_inter, rows = res["interactions"], res["split_rows"]
    else:
        raw = read_source.fn(params.dataset)
        items, inter = with_buckets(raw.items), raw.interactions
        splits = build_splits(inter, params.data.max_history)
        gate_raw.fn(items, inter, params, report_dir)
        gate_splits.fn(splits, items.height, inter["user_id"].n_unique(), params.data.max_history, report_dir)
        version = body(stage_tables)(out_dir, items, splits)
        body(commit_and_publish)(out_dir, db, version, items, inter, h, raw.source_files)
        rows = {name: frame.height for name, frame in splits.items()}
        n_inter = inter.height
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    return {
        "path": path, "wall_s": round(wall, 1), "interactions": n_inter, "rows_per_s": round(n_inter / wall),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "vm_hwm_mib": round(vm("VmHWM") / 1024, 1), "sampled_max_rss_mib": round(sampler.max_rss_kib / 1024, 1),
        "baseline_rss_mib": round(baseline_kib / 1024, 1), "max_spill_mib": round(sampler.max_spill / 2**20, 1),
        "split_rows": rows,
        "split_mib": {n: round((out_dir / "splits" / f"{n}.parquet").stat().st_size / 2**20, 1) for n in rows},
        "store_mib": round(db.stat().st_size / 2**20, 1),
    }


def run_worker(path: str, root: Path, out: Path, memory_limit: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.ingest_stream", "--worker", path, "--root", str(root),
           "--out", str(out), "--memory-limit", memory_limit, "--max-history", str(args.max_history)]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def same_splits(a: Path, b: Path) -> bool:
    for name in ("train", "valid", "test"):
        fa, fb = (pl.scan_parquet(d / "data" / "bench" / "splits" / f"{name}.parquet").sort("user_id", "target_pos")
                  for d in (a, b))
        if not fa.collect().equals(fb.collect()):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--per-user", type=int, default=20)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--memory-limit", default="1GB,512MB", help="DuckDB memory limits of the full-size runs")
    ap.add_argument("--max-history", type=int, default=20)
    ap.add_argument("--compare-users", type=int, default=100_000,
                    help="users of the stream vs polars comparison (0: skip it)")
    ap.add_argument("--chunk-users", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--worker", choices=["stream", "polars"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.root, args.out, args.memory_limit, args.max_history)))
        return

    from benchmarks.common import save, stamp

    scratch = Path(tempfile.mkdtemp(prefix="grc-bench-ingest-"))
    try:
        dataset = {"users": args.users, "per_user": args.per_user, "interactions": args.users * args.per_user,
                   "items": args.items}
        full = scratch / "full"
        dataset |= generate(full / "src", args.users, args.per_user, args.items, args.chunk_users, args.seed, False)
        limits = args.memory_limit.split(",")
        runs = {f"stream_full_{limit}": run_worker("stream", full / "src", full / limit, limit, args)
                for limit in limits}
        shutil.rmtree(full, ignore_errors=True)
        compare = {}
        if args.compare_users:
            small = scratch / "small"
            compare = {"users": args.compare_users, "interactions": args.compare_users * args.per_user}
            compare |= generate(small / "src", args.compare_users, args.per_user, args.items, args.chunk_users,
                                args.seed, True)
            runs["stream_small"] = run_worker("stream", small / "src", small / "stream", limits[0], args)
            runs["polars_small"] = run_worker("polars", small / "src", small / "polars", limits[0], args)
            compare["identical_splits"] = same_splits(small / "stream", small / "polars")
        settings = {"memory_limits": limits, "max_history": args.max_history, "seed": args.seed,
                    "chunk_users": args.chunk_users, "duckdb_threads": os.cpu_count()}
        payload = {**stamp(settings), "dataset": dataset, "compare_dataset": compare, "runs": runs}
        save(f"ingest_stream{'_' + args.tag if args.tag else ''}", payload)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
