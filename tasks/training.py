"""Training routines shared by stages: the backbone's (the `backbone` stage and `mine`'s
cross-fitted fold backbones train the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

from grc_core.config import ModelConfig, TrainConfig
from grc_core.data import Instances, ItemTable
from grc_core.model import Seq2Seq
from grc_core.train import TrainerState, fit_seq2seq, format_record
from grc_core.trie import PrefixTrie
from tasks import io
from tasks.artifacts import load_baseline
from tasks.checkpoints import Checkpointer
from tasks.params import Params
from tasks.progress import epoch_progress


# Every validation's per-user target ranks (epoch, user_id, rank; 1-based, 0 beyond the beam), kept in
# the checkpoint folder so that a resumed run keeps the epochs before the interruption and a run under
# another fingerprint starts a new file (tasks/checkpoints.py removes the folder). What the selection
# saw, per user: benchmarks.crossfit_selection scores each epoch choice on users it was not made on.
VALID_RANKS = "valid_ranks.parquet"


def keep_valid_ranks(path: Path, epoch: int, users: np.ndarray, ranks: np.ndarray) -> None:
    """Add (or replace) one epoch's validation ranks in `path`, written atomically."""
    frame = pl.DataFrame({"epoch": np.full(len(users), epoch, np.int64), "user_id": users.astype(np.int64),
                          "rank": ranks.astype(np.int64)})
    if path.is_file():
        frame = pl.concat([io.read_parquet(path).filter(pl.col("epoch") != epoch), frame])
    io.write_parquet(path, frame.sort("epoch", "user_id"))


def build_model(cfg: ModelConfig, level_sizes: list[int], attr_sizes: list[int], n_items: int, seed: int,
                out_dir: Path | None = None) -> Seq2Seq:
    """An untrained backbone; with `cfg.cf_token`, holding the SASRec of `out_dir` (the sasrec stage's)."""
    cf = None
    if cfg.cf_token:
        if out_dir is None:
            raise ValueError("backbone.model.cf_token needs the run's folder, whose sasrec/ it reads")
        cf = load_baseline(out_dir)
    torch.manual_seed(seed)
    return Seq2Seq(cfg, level_sizes, attr_sizes, n_items, cf)


def fit_backbone(params: Params, train: Instances, valid: Instances, table: ItemTable, trie: PrefixTrie,
                 level_sizes: list[int], attr_sizes: list[int], cfg: TrainConfig, ckpt_dir: Path,
                 fingerprint: str, desc: str = "", teacher: Callable[[Instances], torch.Tensor] | None = None,
                 selection_teacher: Callable[[Instances], torch.Tensor] | None = None) -> tuple[Seq2Seq, TrainerState]:
    """Train a backbone on `train` under `cfg` (resuming from `ckpt_dir`), select on `valid`
    Recall@10; returns the model with the best checkpoint's weights and the trainer state. With a
    `teacher` (SASRec's item log-probabilities), each level's label mixes in its next-code
    distribution at `backbone.cf_distill`, or its log adds to the logits at `backbone.cf_prior`
    (`grc_core.train.fit_seq2seq`); `selection_teacher` (default `teacher`) is the one validation
    decodes with (the stage's SASRec where `teacher` is cross-fitted)."""
    bb = params.backbone
    model = build_model(bb.model, level_sizes, attr_sizes, len(table.codes), cfg.seed,
                        params.dataset_dir()).to(table.codes.device)
    if teacher is not None and bb.cf_prior > 0:  # the residual starts at 0: the product starts as the prior alone
        with torch.no_grad():
            for head in model.heads:
                head.weight.zero_()
                head.bias.zero_()

    ranks_path, latest = ckpt_dir / VALID_RANKS, {}

    def log(record: dict) -> None:
        if "ranks" in latest:  # this epoch's validation: keep its per-user ranks beside the checkpoints
            keep_valid_ranks(ranks_path, record["epoch"], valid.user.numpy(), latest.pop("ranks"))
        print(desc + format_record(record), flush=True)

    bar, on_step = epoch_progress(desc)
    state = fit_seq2seq(model, train, valid, table, trie, cfg, Checkpointer(ckpt_dir, fingerprint), bb.valid_beam,
                        bb.eval_batch_size, params.data.exclude_history, log, on_step, teacher=teacher,
                        distill_weight=bb.cf_distill, distill_temperature=bb.cf_distill_temperature,
                        prior_weight=bb.cf_prior, selection_teacher=selection_teacher,
                        dense_weight=bb.dense_loss_weight if bb.model.dense_head else 0.0,
                        on_valid=lambda ranks: latest.update(ranks=ranks))
    bar.close()
    return model.eval(), state
