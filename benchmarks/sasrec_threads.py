"""Does SASRec's training depend on the torch thread count? The sasrec stage's training
(`grc_core.sasrec.train_sasrec` with params.yaml's `sasrec`), once per `--threads`, on the same
splits; for each: the sha256 of the weights as the stage saves them, the kept epoch, and
validation and test Recall@10 / NDCG@10 ranked as `evaluate` ranks SASRec (full catalog, the
history excluded where `data.exclude_history`).

    python -m benchmarks.sasrec_threads -S data.data_dir=<run>/data [--threads 1 2] [--tag _ml100k]

Reads data/<dataset>/{items.parquet,splits}; writes benchmarks/results/sasrec_threads<tag>.json.
The process's own thread count at start (from the environment, e.g. OMP_NUM_THREADS) is recorded:
with `sasrec.threads` fixed, it must not matter.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import commit, save, stamp
from grc_core import metrics as M
from grc_core.sasrec import best_record, train_sasrec
from tasks import io
from tasks.artifacts import load_rows, load_split, sasrec_top
from tasks.params import load_params


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of the weights written as the stage writes them (tasks/sasrec.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        io.write_safetensors(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
        return hashlib.sha256(path.read_bytes()).hexdigest()


def ranked_metrics(model, inst, exclude_history: bool) -> dict:
    """Recall@10 and NDCG@10 as the evaluate stage's `sasrec` ranker gives them (tasks/artifacts.py)."""
    items, _ = sasrec_top(model, inst, 200, 256, exclude_history)
    per_user = M.per_user_metrics(M.target_ranks(items, inst.target.numpy()), (10,), (10,))
    return {k: float(v.mean()) for k, v in per_user.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    params = load_params(overrides=args.set)
    out_dir = params.dataset_dir()
    report = stamp({"threads": args.threads, "overrides": args.set, "process_threads_at_start": torch.get_num_threads(),
                    "sasrec": asdict(params.sasrec)})
    report["commit"], report["dataset"] = commit(), params.data.dataset
    n_items = io.read_parquet(out_dir / "items.parquet").height
    train, valid = load_rows(out_dir, "train"), load_rows(out_dir, "valid")
    ranked = {s: load_split(out_dir, s, params.data.max_history) for s in ("valid", "test")}
    runs = {}
    for threads in args.threads:
        model, history = train_sasrec(train, valid, n_items, replace(params.sasrec, threads=threads))
        best = best_record(history)
        runs[str(threads)] = {"sha256": weights_sha256(model), "epochs_run": len(history), "best_epoch": best["epoch"],
                              **{s: ranked_metrics(model, inst, params.data.exclude_history)
                                 for s, inst in ranked.items()}}
        print(threads, runs[str(threads)], flush=True)
    report["runs"] = runs
    save(f"sasrec_threads{args.tag}", report)
    return report


if __name__ == "__main__":
    main()
