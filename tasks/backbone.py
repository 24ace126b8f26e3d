"""Backbone tasks: splits + semantic IDs -> tensors; train the TIGER-style model; save it.

Outputs under `data/<dataset>/backbone/`: `model.safetensors` (the best epoch on validation
Recall@10), `config.json` (model config, level and attribute sizes), and `ckpt/` (the
resumable `last/` and `best/` checkpoints). The training log goes to
`reports/<dataset>/backbone_log.csv` for `dvc plots`.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch
from prefect import task

from grc_core import distributed
from grc_core.device import resolve_device
from grc_core.model import count_flops_per_sample
from tasks.artifacts import item_index, load_baseline, load_split, promote_best, sasrec_log_probs, subset, write_log
from tasks.params import Params
from tasks.stages import fingerprint
from tasks.training import fit_backbone


@task
def train_backbone(params: Params) -> dict:
    bb, out_dir = params.backbone, params.dataset_dir()
    device = resolve_device(bb.train.device)
    table, trie, level_sizes, attr_sizes = item_index(out_dir, params.dataset.attributes, device)
    train = load_split(out_dir, "train", params.data.max_history)
    valid = subset(load_split(out_dir, "valid", params.data.max_history), bb.valid_users, bb.train.seed)
    work = out_dir / "backbone"
    log_path = params.reports_dir() / "backbone_log.csv"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    teacher = sasrec_log_probs(load_baseline(out_dir, device)) if bb.cf_distill > 0 else None
    t0 = time.perf_counter()
    model, state = fit_backbone(params, train, valid, table, trie, level_sizes, attr_sizes, bb.train,
                                work / "ckpt", fingerprint(params, "backbone"), teacher=teacher)
    wall = time.perf_counter() - t0
    if distributed.rank_world()[0] == 0:  # under torchrun (tasks/ddp.py) rank 0 alone writes
        write_log(log_path, state.history)
        promote_best(work, {"model": asdict(bb.model), "level_sizes": level_sizes, "attr_sizes": attr_sizes,
                            "attributes": list(params.dataset.attributes)})
    flops = count_flops_per_sample(bb.model, level_sizes, params.data.max_history) * 3  # forward + backward
    rates = [r["samples_per_s"] for r in state.history]
    sps = float(np.median(rates)) if rates else 0.0
    return {"best_epoch": state.best_epoch, "best_valid_recall@10": state.best_metric, "epochs_run": state.epoch,
            "train_instances": len(train), "samples_per_s": sps, "gflops_per_s": sps * flops / 1e9,
            "flops_per_sample": flops, "wall_s_this_run": wall, "parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device), "threads": torch.get_num_threads()}
