"""SASRec baseline tasks: train on the same leave-one-out splits, save, and rank for evaluation.

Outputs under `data/<dataset>/sasrec/`: `model.safetensors`, `config.json`, and the training
log `reports/<dataset>/sasrec_log.csv`.

The ensemble (`sasrec_ensemble.seeds`): further SASRecs, each trained like the first with its own
seed, kept in `data/<dataset>/sasrec_ensemble/` (`model.safetensors`, every member's weights under
the prefix `<seed>.`; `config.json`, the seeds, the architecture and the weight). The weight w of
their mean log-probability beside the first's (grc_core/sasrec.py `fuse_log_probs`) is chosen
here on the validation split, from `sasrec_ensemble.weights`, by the rule that chooses tiger_cf's
weight (the best Recall@10, then NDCG@10, then the smaller w), with history items excluded where
`data.exclude_history`, as the evaluate stage ranks. With no seeds the folder still exists, empty,
so every method's model files are there to fingerprint. Why an ensemble: on instruments a second
SASRec fused with the first is as far above SASRec as tiger_cf is, and tiger_cf steered by the
pair's distribution is above both on validation on ml-100k and instruments (RESULTS.md "TIGER on
top of the pair").
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import torch
from prefect import task

from grc_core import metrics as M
from grc_core.data import history_mask
from grc_core.sasrec import SASRec, best_record, fuse_log_probs, top_by_log_probs, train_sasrec
from grc_core.train import format_record
from tasks import io
from tasks.artifacts import ENSEMBLE, load_rows, load_split, sasrec_log_probs, write_log
from tasks.checkpoints import Checkpointer
from tasks.params import Params
from tasks.stages import fingerprint


def progress_printer(prefix: str = ""):
    def progress(epoch: int, record: dict) -> None:
        print(prefix + format_record(record), flush=True)
    return progress


# The stage's params that only the choice of the ensemble's weight reads (tasks/stages.py's comment
# on the stage): no one SASRec's training or epoch selection reads them.
WEIGHT_CHOICE_PARAMS = ("data.exclude_history", "sasrec_ensemble")


def model_fingerprint(params: Params, member_seed: int | None = None) -> str:
    """The checkpoints' fingerprint of one SASRec of the stage: the first (`member_seed` None) or the
    ensemble member of that seed. It leaves out `WEIGHT_CHOICE_PARAMS`, so a change of the
    ensemble's seeds or weights, or of `data.exclude_history`, resumes every model already trained
    instead of training it again (only the weight is chosen again)."""
    return fingerprint(params, "sasrec", ignore=WEIGHT_CHOICE_PARAMS,
                       extra=None if member_seed is None else {"member_seed": member_seed})


@task
def train_baseline(params: Params) -> dict:
    out_dir, cfg = params.dataset_dir(), params.sasrec
    n_items = io.read_parquet(out_dir / "items.parquet").height
    train, valid = load_rows(out_dir, "train"), load_rows(out_dir, "valid")
    work = out_dir / "sasrec"
    ckpt = Checkpointer(work / "ckpt", model_fingerprint(params))
    model, history = train_sasrec(train, valid, n_items, cfg, progress_printer(), ckpt)
    io.write_safetensors(work / "model.safetensors", {k: v.detach().cpu() for k, v in model.state_dict().items()})
    io.write_json(work / "config.json", model.architecture())
    write_log(params.reports_dir() / "sasrec_log.csv", history)
    return {"epochs_run": len(history), "best": best_record(history),
            "ensemble": train_ensemble(params, model, train, valid, n_items)}


def train_ensemble(params: Params, first: SASRec, train, valid, n_items: int) -> dict:
    """Train `sasrec_ensemble.seeds` (each resumable from its own `ckpt_<seed>/`), choose their
    weight on validation, and write `sasrec_ensemble/`. Returns what config.json records, less
    the architecture."""
    seeds, where = params.sasrec_ensemble.seeds, params.dataset_dir() / ENSEMBLE
    where.mkdir(parents=True, exist_ok=True)
    for stale in where.glob("ckpt_*"):
        if stale.name not in {f"ckpt_{s}" for s in seeds}:
            shutil.rmtree(stale)
    members, runs = [], []
    for seed in seeds:
        ckpt = Checkpointer(where / f"ckpt_{seed}", model_fingerprint(params, seed))
        model, history = train_sasrec(train, valid, n_items, dataclasses.replace(params.sasrec, seed=seed),
                                      progress_printer(f"member {seed}: "), ckpt)
        members.append(model)
        runs.append({"seed": seed, "epochs_run": len(history), "best": best_record(history)})
    return write_ensemble(params, first, members, runs)


def write_ensemble(params: Params, first: SASRec, members: list[SASRec], runs: list[dict]) -> dict:
    """Choose the members' weight on validation and write `sasrec_ensemble/` (members in the order of
    `sasrec_ensemble.seeds`). Returns what config.json records, less the architecture."""
    seeds, where = params.sasrec_ensemble.seeds, params.dataset_dir() / ENSEMBLE
    if len(members) != len(seeds):
        raise ValueError(f"write_ensemble: {len(members)} members for sasrec_ensemble.seeds {list(seeds)}")
    choice = choose_ensemble_weight(params, first, members) if members else None
    record = {"seeds": list(seeds), "weight": choice["chosen"] if choice else 0.0, "choice": choice, "members": runs}
    io.write_safetensors(where / "model.safetensors", {f"{seed}.{k}": v.detach().cpu() for seed, m in zip(seeds, members)
                                                       for k, v in m.state_dict().items()})
    io.write_json(where / "config.json", {**record, "architecture": first.architecture()})
    return record


def choose_ensemble_weight(params: Params, first: SASRec, members: list[SASRec], cells: int = 16_000_000) -> dict:
    """`grc_core.metrics.choose_weight` over `sasrec_ensemble.weights` on every validation user:
    each weight's ranking of the catalog by the fused distribution (top 10 is all the rule reads).
    Users go in batches of at most 256 and of at most `cells` user-item scores (64 MB a matrix)."""
    inst = load_split(params.dataset_dir(), "valid", params.data.max_history)
    batch = max(1, min(256, cells // first.n_items))
    weights = params.sasrec_ensemble.weights
    a, others = sasrec_log_probs(first), [sasrec_log_probs(m) for m in members]
    ranks: dict[float, list[np.ndarray]] = {float(w): [] for w in weights}
    for start in range(0, len(inst), batch):
        part = inst.select(torch.arange(start, min(start + batch, len(inst))))
        la, lo = a(part), [o(part) for o in others]
        mask = history_mask(part.history, la.shape[1]) if params.data.exclude_history else None
        for w in ranks:
            fused = fuse_log_probs(la, lo, w)
            top, _ = top_by_log_probs(fused if mask is None else fused.masked_fill(mask, float("-inf")), 10)
            ranks[w].append(M.target_ranks(top, part.target.numpy()))
    return M.choose_weight({w: np.concatenate(r) for w, r in ranks.items()})
