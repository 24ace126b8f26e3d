"""Candidate generation on 1 and 2 workers of this machine: the scaling efficiency of the Dask path.

    python -m benchmarks.candidates_scaling --dataset instruments --method tiger --users 2000 --beam 120

Copies what the `candidates` stage reads (test split, items, tokenizer, the method's weights)
into a scratch data dir, then runs `python -m flows.candidates` three times on the same users:
(a) one process, 1 torch thread; (b) `candidates.workers=2` (a local Dask cluster of 2
single-threaded processes, prefect-dask); (c) one process, 2 torch threads (the default way to
use both cores). Wall time is the whole flow run (Dask cluster start, model loading, gates and
writes included), read from the stage's report. Efficiency = users/s(b) / (2 x users/s(a)).
The dumps of (a) and (b) must be byte-identical (checked). Writes
`benchmarks/results/candidates_scaling.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import polars as pl

from benchmarks.common import run_flow, save, stamp
from tasks.stages import METHOD_MODELS
from tasks.params import load_params


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="instruments")
    ap.add_argument("--method", default="tiger")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--beam", type=int, default=120)  # >= top_n + max history: no short lists
    ap.add_argument("--top-n", type=int, default=100)
    ap.add_argument("--users-per-shard", type=int, default=250)
    args = ap.parse_args(argv)
    src = load_params(None, [f"data.dataset={args.dataset}"]).dataset_dir()
    scratch = Path(tempfile.mkdtemp(prefix="grc-cand-scaling-"))
    users = pl.read_parquet(src / "splits" / "test.parquet", columns=["user_id"])["user_id"].sort()[:args.users]
    users_file = scratch / "users.txt"
    users_file.write_text("\n".join(str(u) for u in users.to_list()) + "\n")
    runs = {}
    for name, extra in (("1 process, 1 thread", ["candidates.workers=1", "candidates.threads=1"]),
                        ("2 Dask workers, 1 thread each", ["candidates.workers=2", "candidates.threads=1"]),
                        ("1 process, 2 threads", ["candidates.workers=1", "candidates.threads=2"])):
        root = scratch / name.replace(" ", "_").replace(",", "")
        dst = root / "data" / args.dataset
        (dst / "splits").mkdir(parents=True)
        shutil.copy(src / "splits" / "test.parquet", dst / "splits" / "test.parquet")
        shutil.copy(src / "items.parquet", dst / "items.parquet")
        shutil.copytree(src / "tokenizer", dst / "tokenizer")
        for model_dir in METHOD_MODELS[args.method]:
            (dst / model_dir).mkdir(parents=True)
            for f in ("model.safetensors", "config.json"):
                shutil.copy(src / model_dir / f, dst / model_dir / f)
        overrides = [f"data.dataset={args.dataset}", f"data.data_dir={root / 'data'}",
                     f"data.reports_dir={root / 'reports'}", f"candidates.method={args.method}",
                     f"candidates.beam={args.beam}", f"candidates.top_n={args.top_n}",
                     f"candidates.users_per_shard={args.users_per_shard}", f"candidates.users_file={users_file}",
                     *extra]
        wall = run_flow("candidates", overrides)
        report = json.loads((root / "reports" / args.dataset / "candidates.json").read_text())
        runs[name] = {"overrides": extra, "process_wall_s": round(wall, 1), "flow_wall_s": report["wall_s"],
                      "users": report["users"], "users_per_s": round(report["users"] / report["wall_s"], 2),
                      "out": str(dst / "candidates")}
        print(name, runs[name], flush=True)
    a, b = (Path(runs[k]["out"]) for k in ("1 process, 1 thread", "2 Dask workers, 1 thread each"))
    files = sorted(p.name for p in a.glob("part-*.parquet"))
    identical = files == sorted(p.name for p in b.glob("part-*.parquet")) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)
    one, two = runs["1 process, 1 thread"]["users_per_s"], runs["2 Dask workers, 1 thread each"]["users_per_s"]
    result = {**stamp(vars(args)), "runs": runs, "dumps_identical_1_vs_2_workers": identical,
              "speedup_2_workers": round(two / one, 3), "efficiency_2_workers": round(two / (2 * one), 3),
              "speedup_2_workers_vs_2_threads": round(two / runs["1 process, 2 threads"]["users_per_s"], 3)}
    save("candidates_scaling", result)
    shutil.rmtree(scratch, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
