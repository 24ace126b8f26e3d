"""SASRec baseline on a leave-one-out split: test Recall@5/10/100/200 and NDCG@5/10.

    .venv/bin/python -m benchmarks.sasrec_baseline --dataset scientific
    .venv/bin/python -m benchmarks.sasrec_baseline --dataset instruments --repeat-bias false

Every item is ranked (history items are not removed: a target may repeat an earlier item).
Any SASRecConfig field can be overridden (--dropout 0.3 ...); the defaults are the `sasrec` section
of params.yaml. Until 2026-12-02 they were SASRecConfig's own defaults, which differed only in the
seed (0): add `--seed 0` to reproduce the rows of benchmarks/RESULTS.md made before then. Writes
benchmarks/results/sasrec_<dataset>.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import torch

from grc_core.device import set_threads
from grc_core.metrics import per_user_metrics, summarize, target_ranks
from grc_core.sasrec import SASRecConfig, SeqRows, best_record, topk_items, train_sasrec
from tasks.params import load_params

ROOT = Path(__file__).resolve().parent.parent
# cornac 3.0.1 SASRec defaults on the same split / GRC paper's SASRec row, for the report.
REFERENCE = {
    "scientific": {"source": "cornac 3.0.1 SASRec, default settings, on this split",
                   "recall@5": 0.0768, "recall@10": 0.0981, "ndcg@5": 0.0552, "ndcg@10": 0.0620},
    "instruments": {"source": "GRC paper, SASRec",
                    "recall@5": 0.0690, "recall@10": 0.0918, "ndcg@5": 0.0583, "ndcg@10": 0.0657},
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_rows(path: Path) -> SeqRows:
    df = pl.read_parquet(path)
    return SeqRows(df["history"].to_list(), df["target"].to_numpy(), df["user_id"].to_numpy(),
                   df["target_pos"].to_numpy())


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, SASRecConfig]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="scientific")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data")
    ap.add_argument("--out", type=Path, default=None)
    defaults = dataclasses.asdict(load_params().sasrec)  # the stage's settings, from params.yaml
    # One thread (--threads, SASRecConfig.threads): on a shared 2-core machine OpenMP's second thread
    # mostly waits, 3-10x slower; the commands in RESULTS.md ran so.
    defaults["threads"] = 1
    for f in dataclasses.fields(SASRecConfig):
        value = defaults[f.name]
        kind = _bool if isinstance(value, bool) else type(value)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=value)
    args = ap.parse_args(argv)
    cfg = SASRecConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SASRecConfig)})
    return args, cfg


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse_args(argv)
    set_threads(cfg.threads)  # the ranking's too: train_sasrec sets them for its training only
    split_dir = args.data_dir / args.dataset / "splits"
    n_items = pl.read_parquet(args.data_dir / args.dataset / "items.parquet").height
    train, valid, test = (read_rows(split_dir / f"{s}.parquet") for s in ("train", "valid", "test"))

    def log(epoch: int, rec: dict) -> None:
        print(f"epoch {epoch:3d} loss {rec['loss']:.4f} valid R@10 {rec['valid_recall@10']:.4f} "
              f"N@10 {rec['valid_ndcg@10']:.4f} ({rec['seconds']:.1f}s)", flush=True)

    t0 = time.perf_counter()
    model, history = train_sasrec(train, valid, n_items, cfg, progress=log)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    ranked = topk_items(model, test.histories, 200)  # (U, 200)
    metrics = summarize(per_user_metrics(target_ranks(ranked, np.asarray(test.targets))))
    eval_s = time.perf_counter() - t1
    best = best_record(history)

    result = {
        "method": "SASRec (full-softmax CE)",
        "dataset": args.dataset,
        "command": ".venv/bin/python -m benchmarks.sasrec_baseline " + shlex.join(argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "config": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "n_items": n_items,
        "n_test_users": len(test.targets),
        "test": metrics,
        "repeat_offset": model.repeat_offset(),
        "best_epoch": best["epoch"],
        "valid_at_best": {k[len("valid_"):]: v for k, v in best.items() if k.startswith("valid_")},
        "epochs_run": len(history),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 2),
        "reference": REFERENCE.get(args.dataset),
        "history": history,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"sasrec_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"test": metrics, "best_epoch": best["epoch"], "train_seconds": result["train_seconds"]},
                     indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
