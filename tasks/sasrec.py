"""SASRec baseline tasks: train on the same leave-one-out splits, save, and rank for evaluation.

Outputs under `data/<dataset>/sasrec/`: `model.safetensors`, `config.json`, and the training
log `reports/<dataset>/sasrec_log.csv`.
"""

from __future__ import annotations

from dataclasses import asdict

import polars as pl
from prefect import task

from grc_core.sasrec import train_sasrec
from grc_core.train import format_record
from tasks import io
from tasks.artifacts import load_rows, write_log
from tasks.params import Params


@task
def train_baseline(params: Params) -> dict:
    out_dir, cfg = params.dataset_dir(), params.sasrec
    n_items = pl.read_parquet(out_dir / "items.parquet").height

    def progress(epoch: int, record: dict) -> None:
        print(format_record(record), flush=True)

    model, history = train_sasrec(load_rows(out_dir, "train"), load_rows(out_dir, "valid"), n_items, cfg, progress)
    work = out_dir / "sasrec"
    io.write_safetensors(work / "model.safetensors", {k: v.detach().cpu() for k, v in model.state_dict().items()})
    io.write_json(work / "config.json", {"config": asdict(cfg), "n_items": n_items})
    write_log(params.reports_dir() / "sasrec_log.csv", history)
    best = max(history, key=lambda r: r.get("valid_recall@10", -1.0)) if history else {}
    return {"epochs_run": len(history), "best": best}
