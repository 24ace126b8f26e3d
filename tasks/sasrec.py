"""SASRec baseline tasks: train on the same leave-one-out splits, save, and rank for evaluation.

Outputs under `data/<dataset>/sasrec/`: `model.safetensors`, `config.json`, and the training
log `reports/<dataset>/sasrec_log.csv`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import torch
from prefect import task
from safetensors.torch import load_file

from grc_core.sasrec import SASRec, SASRecConfig, SeqRows, topk_items, train_sasrec
from grc_core.train import format_record
from tasks import io
from tasks.backbone import write_log
from tasks.params import Params


def load_rows(out_dir: Path, name: str) -> SeqRows:
    f = pl.read_parquet(out_dir / "splits" / f"{name}.parquet")
    return SeqRows(f["history"].to_list(), f["target"].to_numpy().astype(np.int64),
                   f["user_id"].to_numpy(), f["target_pos"].to_numpy())


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


def load_baseline(out_dir: Path, device: torch.device | str = "cpu") -> SASRec:
    meta = json.loads((out_dir / "sasrec" / "config.json").read_text())
    model = SASRec(meta["n_items"], SASRecConfig(**meta["config"]))
    model.load_state_dict(load_file(str(out_dir / "sasrec" / "model.safetensors")))
    return model.to(device).eval()


def rank_with_sasrec(out_dir: Path, histories: list[list[int]], k: int, device: torch.device | str,
                     exclude_history: bool = False) -> np.ndarray:
    return topk_items(load_baseline(out_dir, device), histories, k, histories if exclude_history else None)
