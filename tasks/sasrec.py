"""SASRec baseline tasks: train on the same leave-one-out splits, save, and rank for evaluation.

Outputs under `data/<dataset>/sasrec/`: `model.safetensors`, `config.json`, and the training
log `reports/<dataset>/sasrec_log.csv`.
"""

from __future__ import annotations

from prefect import task

from grc_core.sasrec import best_record, train_sasrec
from grc_core.train import format_record
from tasks import io
from tasks.artifacts import load_rows, write_log
from tasks.checkpoints import Checkpointer
from tasks.params import Params
from tasks.stages import fingerprint


@task
def train_baseline(params: Params) -> dict:
    out_dir, cfg = params.dataset_dir(), params.sasrec
    n_items = io.read_parquet(out_dir / "items.parquet").height

    def progress(epoch: int, record: dict) -> None:
        print(format_record(record), flush=True)

    work = out_dir / "sasrec"
    ckpt = Checkpointer(work / "ckpt", fingerprint(params, "sasrec"))
    model, history = train_sasrec(load_rows(out_dir, "train"), load_rows(out_dir, "valid"), n_items, cfg, progress, ckpt)
    io.write_safetensors(work / "model.safetensors", {k: v.detach().cpu() for k, v in model.state_dict().items()})
    io.write_json(work / "config.json", model.architecture())
    write_log(params.reports_dir() / "sasrec_log.csv", history)
    return {"epochs_run": len(history), "best": best_record(history)}
