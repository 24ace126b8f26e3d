"""Peak memory of the in-memory ingest against one user's sequence length.

    python -m benchmarks.ingest_memory [--lengths 1000,5000,10000,100000,1000000]
        [--before REV --before-lengths 1000,5000,10000]

For each length L a fresh subprocess (`--worker`) writes a synthetic RecBole file, one user with
L interactions plus 50 users with 20 each, over 5,000 items, with increasing timestamps, and runs
`read_recbole`, `build_splits` (data.max_history 20) and the Parquet export of the splits. The
Great Expectations gates are left out: their import alone is a few hundred MB, the same at
every length. The subprocess's peak RSS comes from wait4 (its ru_maxrss); it also reports
ru_maxrss after each step, and the RSS it held before reading (interpreter, polars, prefect).
Between successive lengths, the peak's growth per added interaction is constant if memory is
linear in the interactions, and grows with the length if it is quadratic.

`--before REV` measures `tasks/readers.py` and `tasks/ingest.py` as they are at REV (loaded with
`git show`) at `--before-lengths`; keep those small: before the fix one user of 10,000 items
needed 1.9 GB and 20,000 over 6 GB. Writes benchmarks/results/ingest_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import polars as pl

from tasks.env import PROJECT_ROOT

NORMAL_USERS, NORMAL_LENGTH, ITEMS, MAX_HISTORY = 50, 20, 5_000, 20


def write_source(root: Path, length: int) -> int:
    """`bench.inter`: user 0 with `length` interactions, users 1..50 with 20; returns the row count.
    Built in polars (about 24 bytes a row), so the RSS before reading stays near the interpreter's."""
    long = pl.DataFrame({"user_id": pl.zeros(length, pl.Int64, eager=True),
                         "item_id": (pl.int_range(length, eager=True) * 7) % ITEMS,
                         "timestamp": pl.int_range(length, eager=True) + 1_600_000_000})
    k = pl.int_range(NORMAL_USERS * NORMAL_LENGTH, eager=True)
    user = k // NORMAL_LENGTH + 1
    normal = pl.DataFrame({"user_id": user, "item_id": (user * 31 + k % NORMAL_LENGTH) % ITEMS,
                           "timestamp": k % NORMAL_LENGTH + 1_600_000_000})
    frame = pl.concat([long, normal])
    with open(root / "bench.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        frame.write_csv(f, separator="\t", include_header=False)
    return frame.height


def load_code(rev: str | None) -> tuple:
    """(read_recbole, build_splits) from the working tree, or as they were at git revision `rev`."""
    if rev is not None:
        for name in ("tasks.readers", "tasks.ingest"):  # readers first: ingest imports it
            source = subprocess.run(["git", "show", f"{rev}:{name.replace('.', '/')}.py"], cwd=PROJECT_ROOT,
                                    check=True, capture_output=True, text=True).stdout
            module = types.ModuleType(name)
            module.__file__ = f"{rev}:{name.replace('.', '/')}.py"
            sys.modules[name] = module
            exec(compile(source, module.__file__, "exec"), module.__dict__)
    from tasks.ingest import build_splits
    from tasks.readers import read_recbole

    return read_recbole, build_splits


def peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def worker(length: int, rev: str | None) -> dict:
    from tasks import io

    read_recbole, build_splits = load_code(rev)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = write_source(root, length)
        out = {"length": length, "interactions": rows, "source_mib": round((root / "bench.inter").stat().st_size
                                                                          / 2**20, 2),
               "baseline_mib": peak_mib()}
        t0 = time.perf_counter()
        raw = read_recbole(root, "bench")
        out |= {"read_peak_mib": peak_mib(), "read_s": round(time.perf_counter() - t0, 2)}
        t0 = time.perf_counter()
        splits = build_splits(raw.interactions, MAX_HISTORY)
        out |= {"splits_peak_mib": peak_mib(), "splits_s": round(time.perf_counter() - t0, 2)}
        t0 = time.perf_counter()
        for name, frame in splits.items():
            io.write_parquet(root / f"{name}.parquet", frame)
        out |= {"export_peak_mib": peak_mib(), "export_s": round(time.perf_counter() - t0, 2)}
        # n - 3 training rows per user: the long one and 50 of 20.
        assert splits["train"].height == (length - 3) + NORMAL_USERS * (NORMAL_LENGTH - 3), splits["train"].height
        out["train_rows"] = splits["train"].height
    return out


def measure(length: int, rev: str | None) -> dict:
    """One worker subprocess; its own peak RSS from wait4."""
    cmd = [sys.executable, "-m", "benchmarks.ingest_memory", "--worker", str(length)]
    if rev is not None:
        cmd += ["--rev", rev]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "POLARS_MAX_THREADS": "2"})
    t0 = time.perf_counter()
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    peak = usage.ru_maxrss / 1024
    return {"code": rev or "working tree", **result, "peak_rss_mib": round(peak, 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


def with_slopes(rows: list[dict]) -> list[dict]:
    """Add `marginal_bytes_per_interaction`: peak RSS growth over the previous (shorter) row of the
    same code, per added interaction. Constant if memory is linear; it grows with L if quadratic."""
    for prev, row in zip(rows, rows[1:]):
        if prev["code"] == row["code"]:
            row["marginal_bytes_per_interaction"] = round(
                (row["peak_rss_mib"] - prev["peak_rss_mib"]) * 2**20 / (row["interactions"] - prev["interactions"]))
    return rows


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=ints, default=[1_000, 5_000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--before", default=None, help="a git revision to measure as well (tasks/readers.py, tasks/ingest.py)")
    ap.add_argument("--before-lengths", type=ints, default=[1_000, 5_000, 10_000])
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rev", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.rev)))
        return

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "tasks/readers.py", "tasks/ingest.py"],
                           cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()
    rows = []
    if args.before:
        rows += [measure(n, args.before) for n in sorted(args.before_lengths)]
    rows = with_slopes(rows + [measure(n, None) for n in sorted(args.lengths)])
    # Imported only now: it loads torch, and a worker forked from a bigger parent inherits the
    # parent's RSS as the start of its own ru_maxrss.
    from benchmarks.common import save, stamp

    for r in rows:
        print(f"{r['code']:>14} {r['length']:>9,} items: peak {r['peak_rss_mib']:>8,.0f} MiB "
              f"(before reading {r['baseline_mib']:,.0f}, after build_splits {r['splits_peak_mib']:,.0f}), "
              f"{r.get('marginal_bytes_per_interaction', '-')} B per added interaction", flush=True)
    save("ingest_memory", {**stamp({"normal_users": NORMAL_USERS, "normal_length": NORMAL_LENGTH, "items": ITEMS,
                                    "max_history": MAX_HISTORY, "polars_max_threads": 2}),
                           "commit": commit + ("-dirty" if dirty else ""), "rows": rows})


if __name__ == "__main__":
    main()
