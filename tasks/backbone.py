"""Backbone tasks: splits + semantic IDs -> tensors; train the TIGER-style model; save it.

Outputs under `data/<dataset>/backbone/`: `model.safetensors` (the best epoch on validation
Recall@10), `config.json` (model config, level and attribute sizes), and `ckpt/` (the
resumable `last/` and `best/` checkpoints). The training log goes to
`reports/<dataset>/backbone_log.csv` for `dvc plots`.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import torch
from prefect import task
from tqdm.auto import tqdm

from grc_core import distributed
from grc_core.data import Instances, ItemTable, make_instances
from grc_core.model import ModelConfig, Seq2Seq, count_flops_per_sample
from grc_core.device import resolve_device
from grc_core.train import TrainConfig, TrainerState, fit_seq2seq, format_record
from grc_core.trie import PrefixTrie
from tasks import io
from tasks.params import Params
from tasks.readers import sha256_file
from tasks.tokenize import load_semantic_ids


def load_split(out_dir: Path, name: str, max_len: int) -> Instances:
    frame = pl.read_parquet(out_dir / "splits" / f"{name}.parquet")
    return make_instances(frame["user_id"].to_list(), frame["history"].to_list(), frame["target"].to_list(), max_len)


def load_item_table(out_dir: Path, attributes: tuple[str, ...]) -> tuple[ItemTable, list[int], list[int]]:
    ids, level_sizes = load_semantic_ids(out_dir / "tokenizer")
    items = pl.read_parquet(out_dir / "items.parquet").sort("item_id")
    cols = [items[f"{a}_bucket"].to_numpy().astype(np.int64) for a in attributes]
    attrs = np.stack(cols, 1) if cols else np.zeros((items.height, 0), np.int64)  # (N, A)
    attr_sizes = [int(c.max()) + 1 for c in cols]
    return ItemTable(torch.from_numpy(ids), torch.from_numpy(attrs)), level_sizes, attr_sizes


def subset(inst: Instances, n: int, seed: int) -> Instances:
    if n <= 0 or n >= len(inst):
        return inst
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(inst), generator=gen)[:n].sort().values
    return inst.select(idx)


def build_model(cfg: ModelConfig, level_sizes: list[int], attr_sizes: list[int], seed: int) -> Seq2Seq:
    torch.manual_seed(seed)
    return Seq2Seq(cfg, level_sizes, attr_sizes)


@task
def train_backbone(params: Params) -> dict:
    bb, out_dir = params.backbone, params.dataset_dir()
    device = resolve_device(bb.train.device)
    if bb.model.max_history < params.data.max_history:
        raise ValueError("backbone.model.max_history must be >= data.max_history")
    table, level_sizes, attr_sizes = load_item_table(out_dir, params.dataset.attributes)
    table = table.to(device)
    trie = PrefixTrie.from_ids(table.codes.cpu().numpy(), level_sizes).to(device)
    train = load_split(out_dir, "train", params.data.max_history)
    valid = subset(load_split(out_dir, "valid", params.data.max_history), bb.valid_users, bb.train.seed)
    work = out_dir / "backbone"
    log_path = params.reports_dir() / "backbone_log.csv"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fingerprint = "|".join([params.section_hash("backbone"), str(params.data.max_history),
                            sha256_file(out_dir / "splits" / "train.parquet"),
                            sha256_file(out_dir / "tokenizer" / "semantic_ids.parquet")])
    model, state = fit_backbone(params, train, valid, table, trie, level_sizes, attr_sizes, bb.train,
                                work / "ckpt", fingerprint)
    wall = time.perf_counter() - t0
    if distributed.rank_world()[0] == 0:  # under torchrun (tasks/ddp.py) rank 0 alone writes
        write_log(log_path, state.history)
        shutil.copyfile(work / "ckpt" / "best" / "model.safetensors", work / "model.safetensors.tmp")
        (work / "model.safetensors.tmp").replace(work / "model.safetensors")
        io.write_json(work / "config.json", {"model": asdict(bb.model), "level_sizes": level_sizes,
                                             "attr_sizes": attr_sizes, "attributes": list(params.dataset.attributes)})
    flops = count_flops_per_sample(bb.model, level_sizes, params.data.max_history) * 3  # forward + backward
    rates = [r["samples_per_s"] for r in state.history]
    sps = float(np.median(rates)) if rates else 0.0
    return {"best_epoch": state.best_epoch, "best_valid_recall@10": state.best_metric, "epochs_run": state.epoch,
            "train_instances": len(train), "samples_per_s": sps, "gflops_per_s": sps * flops / 1e9,
            "flops_per_sample": flops, "wall_s_this_run": wall, "parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device), "threads": torch.get_num_threads()}


def fit_backbone(params: Params, train: Instances, valid: Instances, table: ItemTable, trie: PrefixTrie,
                 level_sizes: list[int], attr_sizes: list[int], cfg: TrainConfig, ckpt_dir: Path,
                 fingerprint: str, desc: str = "") -> tuple[Seq2Seq, TrainerState]:
    """Train a backbone on `train` under `cfg` (resuming from `ckpt_dir`), select on `valid`
    Recall@10; returns the model with the best checkpoint's weights and the trainer state."""
    bb = params.backbone
    model = build_model(bb.model, level_sizes, attr_sizes, cfg.seed).to(table.codes.device)

    def log(record: dict) -> None:
        print(desc + format_record(record), flush=True)

    bar, on_step = epoch_progress(desc)
    state = fit_seq2seq(model, train, valid, table, trie, cfg, ckpt_dir, fingerprint, bb.valid_beam,
                        bb.eval_batch_size, params.data.exclude_history, log, on_step)
    bar.close()
    return model.eval(), state


def epoch_progress(prefix: str):
    """A tqdm bar that restarts at each epoch, and the `on_step(epoch, steps, loss)` hook of `fit` driving it."""
    bar = tqdm(total=0, unit="step", mininterval=5, dynamic_ncols=True)
    bar_epoch = [-1]

    def on_step(epoch: int, steps: int, loss: float) -> None:
        if epoch != bar_epoch[0]:
            bar_epoch[0] = epoch
            bar.reset(total=steps)
            bar.set_description(f"{prefix}epoch {epoch + 1}")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    return bar, on_step


def write_log(path: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = sorted({k for r in history for k in r})
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def load_backbone(out_dir: Path, device: torch.device | str = "cpu", weights: Path | None = None) -> Seq2Seq:
    """The stage backbone, or the same architecture with other `weights` (e.g. a cross-fitted fold's)."""
    cfg = json.loads((out_dir / "backbone" / "config.json").read_text())
    model = Seq2Seq(ModelConfig(**cfg["model"]), cfg["level_sizes"], cfg["attr_sizes"])
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(weights or out_dir / "backbone" / "model.safetensors")))
    return model.to(device).eval()
