"""Backbone tasks: splits + semantic IDs -> tensors; train the TIGER-style model; save it.

Outputs under `data/<dataset>/backbone/`: `model.safetensors` (the best epoch on validation
Recall@10), `config.json` (model config, level and attribute sizes), and `ckpt/` (the
resumable `last/` and `best/` checkpoints, and `valid_ranks.parquet`: every validation's
per-user target ranks, tasks/training.py). The training log goes to
`reports/<dataset>/backbone_log.csv` for `dvc plots`.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from prefect import task

from grc_core import distributed
from grc_core.data import Instances, user_folds
from grc_core.device import resolve_device
from grc_core.model import count_flops_per_sample
from grc_core.sasrec import best_record, train_sasrec
from grc_core.train import format_record
from tasks import io
from tasks.artifacts import (item_index, load_baseline, load_rows, load_split, promote_best, sasrec_log_probs, subset,
                             write_log)
from tasks.checkpoints import Checkpointer
from tasks.params import Params
from tasks.stages import fingerprint
from tasks.training import fit_backbone


def crossfit_teacher(params: Params, device: torch.device) -> tuple[Callable[[Instances], torch.Tensor], list[dict]]:
    """`backbone.cf_teacher_folds` F >= 2 SASRecs (`sasrec.*`), fold f trained on the training rows of
    the other folds' users and selected on fold f's validation rows, kept (with resumable
    checkpoints) in backbone/teachers/f<k>/; returns instances -> each instance's log-softmax from
    the SASRec that never saw its user, and one report per fold."""
    if distributed.rank_world()[1] > 1:
        raise ValueError("backbone.cf_teacher_folds >= 2 trains its SASRecs in one process: train them first "
                         "without torchrun (the checkpoints in backbone/teachers/ are then resumed), or set it to 0")
    out_dir, folds, seed = params.dataset_dir(), params.backbone.cf_teacher_folds, params.backbone.train.seed
    train_rows, valid_rows = load_rows(out_dir, "train"), load_rows(out_dir, "valid")
    n_items = io.read_parquet(out_dir / "items.parquet").height
    train_fold, valid_fold = user_folds(train_rows.users, folds, seed), user_folds(valid_rows.users, folds, seed)
    models, info = [], []
    for f in range(folds):
        work = out_dir / "backbone" / "teachers" / f"f{f}"
        ckpt = Checkpointer(work / "ckpt", fingerprint(params, "backbone", extra={"teacher_fold": f}))
        fit_rows = np.flatnonzero(train_fold != f)
        model, history = train_sasrec(train_rows.select(fit_rows), valid_rows.select(np.flatnonzero(valid_fold == f)),
                                      n_items, params.sasrec,
                                      lambda e, r: print(f"teacher {f + 1}/{folds} " + format_record(r), flush=True),
                                      ckpt)
        models.append(sasrec_log_probs(model.to(device)))
        info.append({"fold": f, "train_rows": len(fit_rows), "best": best_record(history)})

    def item_logp(inst: Instances) -> torch.Tensor:
        fold = user_folds(inst.user.numpy(), folds, seed)  # (B,)
        out = torch.empty(len(inst), n_items)
        for f in np.unique(fold):
            idx = torch.from_numpy(np.flatnonzero(fold == f))
            out[idx] = models[f](inst.select(idx)).to(out.dtype).cpu()
        return out  # (B, N)
    return item_logp, info


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
    teacher = sasrec_log_probs(load_baseline(out_dir, device)) if bb.cf_distill > 0 or bb.cf_prior > 0 else None
    train_teacher, teachers = teacher, []
    if teacher is not None and bb.cf_teacher_folds >= 2:
        train_teacher, teachers = crossfit_teacher(params, device)
    t0 = time.perf_counter()
    model, state = fit_backbone(params, train, valid, table, trie, level_sizes, attr_sizes, bb.train,
                                work / "ckpt", fingerprint(params, "backbone"), teacher=train_teacher,
                                selection_teacher=teacher)
    wall = time.perf_counter() - t0
    if distributed.rank_world()[0] == 0:  # under torchrun (tasks/ddp.py) rank 0 alone writes
        write_log(log_path, state.history)
        promote_best(work, {**model.architecture(), "attributes": list(params.dataset.attributes), "cf_prior": bb.cf_prior})
    # Forward + backward at the full window: an upper bound where to_batch trims a batch of short histories.
    flops = count_flops_per_sample(bb.model, level_sizes, params.data.max_history) * 3
    rates = [r["samples_per_s"] for r in state.history]
    sps = float(np.median(rates)) if rates else 0.0
    return {"best_epoch": state.best_epoch, "best_valid_recall@10": state.best_metric, "epochs_run": state.epoch,
            "train_instances": len(train), "samples_per_s": sps, "gflops_per_s": sps * flops / 1e9,
            "flops_per_sample": flops, "wall_s_this_run": wall, "parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device), "threads": torch.get_num_threads(), "teacher_folds": teachers}
