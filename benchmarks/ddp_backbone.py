"""Backbone training on 1 process and under DDP (torchrun, 2 gloo processes) with the same global batch.

    python -m benchmarks.ddp_backbone --dataset scientific --epochs 1

Copies the inputs of the `backbone` stage into two scratch data dirs and trains there: (a)
`python -m tasks.ddp backbone` as one process with 2 torch threads, (b) `torchrun --standalone
--nproc_per_node=2 -m tasks.ddp backbone` with 1 thread per process. Reports samples/s of each
(from the stage report), the largest absolute weight difference between the two results, and
their validation Recall@10. On one 2-core machine DDP cannot be faster than 2 threads; the
point is that the same command scales out across nodes and gives the same model. Writes
`benchmarks/results/ddp_backbone.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from benchmarks.common import save, stamp
from tasks.env import PROJECT_ROOT
from tasks.params import load_params


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="scientific")
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args(argv)
    src = load_params(None, [f"data.dataset={args.dataset}"]).dataset_dir()
    scratch = Path(tempfile.mkdtemp(prefix="grc-ddp-"))
    venv_bin = Path(sys.executable).parent
    runs = {}
    for name, launcher, threads in (("1 process, 2 threads", [sys.executable, "-m", "tasks.ddp"], 2),
                                    ("DDP 2 processes, 1 thread each",
                                     [str(venv_bin / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
                                      "tasks.ddp"], 1)):
        root = scratch / ("single" if threads == 2 else "ddp")
        dst = root / "data" / args.dataset
        dst.mkdir(parents=True)
        for d in ("splits", "tokenizer"):
            shutil.copytree(src / d, dst / d)
        shutil.copy(src / "items.parquet", dst / "items.parquet")
        cmd = [*launcher, "backbone", "-S", f"data.dataset={args.dataset}", "-S", f"data.data_dir={root / 'data'}",
               "-S", f"data.reports_dir={root / 'reports'}", "-S", f"backbone.train.epochs={args.epochs}",
               "-S", f"backbone.train.threads={threads}"]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=PROJECT_ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        wall = time.perf_counter() - t0
        report = json.loads((root / "reports" / args.dataset / "backbone.json").read_text())
        runs[name] = {"command": " ".join(Path(c).name if c.startswith("/") and i == 0 else c for i, c in enumerate(cmd)),
                      "process_wall_s": round(wall, 1), "samples_per_s": round(report["samples_per_s"], 1),
                      "gflops_per_s": round(report["gflops_per_s"], 1),
                      "valid_recall@10": report["best_valid_recall@10"], "world_size": report["world_size"],
                      "weights": str(dst / "backbone" / "model.safetensors")}
        print(name, runs[name], flush=True)
    a, b = (load_file(r["weights"]) for r in runs.values())
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(v.abs().max()) for v in a.values())
    result = {**stamp(vars(args)), "runs": runs, "max_abs_weight_diff": diff, "max_abs_weight": scale}
    save("ddp_backbone", result)
    shutil.rmtree(scratch, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
