"""SFT tasks (GRC paper Sec. 4.1.2): the generate/reflect/correct template on mined drafts.

Each variant (`sft.variants`: grc = full template, gc = the GC-SFT ablation without reflection
labels) starts from the backbone's weights and trains on every mined training instance with
its M drafts (`mine.top + mine.sampled`) per step, loss Eq. 10 (`grc_core.grc.sft_loss`).
Model selection: Recall@10 of two-pass decoding at `sft.valid_beam` on a fixed validation
subset. Outputs under `data/<dataset>/sft/<variant>/`: `model.safetensors`, `config.json`,
resumable `ckpt/`; the log goes to `reports/<dataset>/sft_<variant>_log.csv`.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import torch
from prefect import task

from grc_core import distributed
from grc_core.data import to_batch
from grc_core.device import resolve_device
from grc_core.config import SFTLossConfig
from grc_core.grc import GRCModel, sft_loss
from grc_core.model import Seq2Seq
from grc_core.train import fit, format_record
from tasks import io
from tasks.artifacts import (grc_selection_metrics, item_index, load_backbone, load_split, promote_best,
                            require_plain_backbone, subset, write_log)
from tasks.checkpoints import Checkpointer
from tasks.params import Params
from tasks.progress import epoch_progress
from tasks.stages import fingerprint


class MinedDrafts:
    """Mined rows regrouped per instance: drafts (n, M, L), r_loc (n, M), r_sem (n, M, K)."""

    def __init__(self, frame: pl.DataFrame, attributes: tuple[str, ...]):
        frame = frame.sort(["instance", "cand"])
        m = int(frame["cand"].max()) + 1
        n = frame.height // m
        if n * m != frame.height:
            raise ValueError(f"mined drafts: {frame.height} rows is not a multiple of M={m} candidates")
        self.instance = torch.from_numpy(frame["instance"].to_numpy()[::m].copy())  # (n,)
        self.drafts = torch.from_numpy(np.stack(frame["codes"].to_numpy()).astype(np.int64)).view(n, m, -1)
        self.r_loc = torch.from_numpy(frame["r_loc"].to_numpy().astype(np.int64)).view(n, m)
        sem = [frame[f"r_sem_{a}"].to_numpy().astype(np.int64) for a in attributes]
        self.r_sem = (torch.from_numpy(np.stack(sem, 1)) if sem else torch.zeros(n * m, 0, dtype=torch.long)).view(n, m, -1)

    def __len__(self) -> int:
        return self.instance.shape[0]


def build_grc(seq: Seq2Seq, num_attrs: int, variant: str, seed: int) -> GRCModel:
    torch.manual_seed(seed)
    return GRCModel(seq, num_attrs, reflect=(variant == "grc"))


@task
def train_sft(params: Params, variant: str) -> dict:
    sf, out_dir = params.sft, params.dataset_dir()
    require_plain_backbone(out_dir, "the sft stage (GRC starts from the backbone)")
    device = resolve_device(sf.train.device)
    attributes = params.dataset.attributes
    table, trie, level_sizes, _ = item_index(out_dir, attributes, device)
    mined = MinedDrafts(io.read_parquet(out_dir / "mine" / "train.parquet"), attributes)
    train = load_split(out_dir, "train", params.data.max_history).select(mined.instance)
    valid = subset(load_split(out_dir, "valid", params.data.max_history), sf.valid_users, sf.train.seed)
    model = build_grc(load_backbone(out_dir, device), len(attributes), variant, sf.train.seed).to(device)
    loss_cfg = SFTLossConfig(sf.lambda_rc, sf.draft_loss)
    drafts, r_loc, r_sem = mined.drafts.to(device), mined.r_loc.to(device), mined.r_sem.to(device)

    def loss_fn(m: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        batch = to_batch(train.select(idx), table)
        loss, _ = sft_loss(m, batch, drafts[idx.to(device)], r_loc[idx.to(device)], r_sem[idx.to(device)], loss_cfg)
        return loss

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return grc_selection_metrics(m, valid, table, trie, sf.valid_beam, params.evaluate.rank_rule,
                                     params.evaluate.verify_gamma, sf.eval_batch_size, params.data.exclude_history)

    work = out_dir / "sft" / variant
    bar, on_step = epoch_progress(f"sft {variant} ")

    def log(record: dict) -> None:
        print(f"sft {variant} " + format_record(record), flush=True)

    # Validation of the starting point: the backbone inside the template (the correction head is untrained).
    t0 = time.perf_counter()
    ckpt = Checkpointer(work / "ckpt", fingerprint(params, "sft", extra={"variant": variant}))
    state = fit(model, len(mined), loss_fn, evaluate, sf.train, ckpt, select="recall@10", log=log, on_step=on_step)
    bar.close()
    wall = time.perf_counter() - t0
    ckpt.load_weights("best", model)
    if distributed.rank_world()[0] == 0:  # under torchrun (tasks/ddp.py) rank 0 alone writes
        write_log(params.reports_dir() / f"sft_{variant}_log.csv", state.history)
        promote_best(work, {**model.seq.architecture(), "num_attrs": len(attributes), "variant": variant})
    rates = [r["samples_per_s"] for r in state.history]
    return {"variant": variant, "best_epoch": state.best_epoch, "best_valid_recall@10": state.best_metric,
            "epochs_run": state.epoch, "instances": len(mined), "drafts_per_instance": int(mined.drafts.shape[1]),
            "instances_per_s": float(np.median(rates)) if rates else 0.0, "wall_s_this_run": wall}
