"""Mine reflection labels from the backbone's beams (GRC paper Sec. 4.1.1).

For each instance the trained backbone's constrained beam search (width `mine.beam`) proposes
drafts; we keep the `mine.top` best beams and `mine.sampled` more drawn uniformly from the
rest of the beam (a fixed seed), so that SFT also sees the deeper, mostly wrong drafts that
two-pass inference corrects at beam 200. Each kept draft gets
- r_loc in 1..L+1: the first level where its ID differs from the target's (Eq. 4; L+1 = correct);
- one r_sem per attribute of `datasets.<ds>.attributes`: 1 if the draft item's bucket equals the
  target item's (Eq. 5). Bucket 0 ("unknown") is a value like any other: two items of unknown
  brand agree on brand.

Cross-fitting (`mine.crossfit_folds` F >= 2). A backbone drafts its own training instances far
better than unseen ones (it has fitted them: on scientific the top training draft was right
17.7% of the time against 4.3% on validation), so SFT on such drafts teaches the reflection a
base rate it never meets at test time. With F folds, training users are split into F groups
(a seeded hash of the user id, `user_folds`); fold f's instances are drafted by a backbone trained, with
the stage's `backbone.*` settings for `mine.crossfit_epochs` epochs (0: the stage backbone's best
epoch), on the other folds' users only. Validation instances are always drafted by the stage
backbone, the model that drafts at test time. Fold backbones are kept in `mine/folds/f<k>/`
and resume from their checkpoints when the stage is re-run after an interruption.

Positives for the verifier (`mine.include_target`, not in the paper): the backbone's top drafts
are rarely the target (on ml-100k the share of drafts with r_loc = L+1 is about 5%), so the
reflection's r_loc head learns the base rate. With the flag, each training instance whose M drafts
miss the target has its last draft replaced by the target itself (r_loc = L+1, every r_sem 1,
beam_rank -1, score NaN). Validation drafts stay as the backbone made them.

Outputs `data/<dataset>/mine/{train,valid}.parquet`, one row per (instance, candidate):
instance (row in the split), user_id, target, cand (0..M-1), beam_rank, item, score, codes
(list), r_loc, and r_sem_<attribute> per attribute. `reports/<dataset>/mine.json` compares
the label distributions on mined training instances and on validation instances.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from grc_core.beam_search import beam_search
from grc_core.data import Instances, to_batch, user_folds
from grc_core.device import resolve_device, set_threads
from grc_core.evaluation import history_mask
from grc_core.model import BackboneStepper
from grc_core.rewards import attribute_consistency, first_divergence
from grc_core.trie import PrefixTrie
from tasks import io
from tasks.artifacts import item_index, load_backbone, load_split, require_plain_backbone, subset
from tasks.io import sha256_file
from tasks.params import Params
from tasks.stages import fingerprint, input_digests
from tasks.training import fit_backbone
from tasks.quality import gx_expectations, run_gate


def choose_candidates(valid: np.ndarray, top: int, sampled: int, keys: np.ndarray) -> np.ndarray:
    """Beam positions (n, top+sampled): the `top` best, then `sampled` distinct positions drawn
    uniformly from the remaining valid ones (smallest random key first).

    valid: (n, beam) bool, True where the beam returned an item (an excluded history item can
    leave a beam short); keys: (n, beam) uniform random keys fixed per instance, so the choice
    does not depend on the batch size.
    """
    n, beam = valid.shape
    if top + sampled > beam or top < 0 or sampled < 0 or top + sampled == 0:
        raise ValueError(f"mine: need 0 < top + sampled <= beam, got top={top} sampled={sampled} beam={beam}")
    short = valid.sum(1) < top + sampled
    if short.any():
        row = int(np.argmax(short))
        raise ValueError(f"mine: instance {row} has only {int(valid[row].sum())} items in its beam of {beam}, "
                         f"fewer than top + sampled = {top + sampled}; raise mine.beam")
    head = np.broadcast_to(np.arange(top), (n, top))
    if sampled == 0:
        return np.ascontiguousarray(head)
    k = np.where(valid[:, top:], keys[:, top:], np.inf)  # (n, beam-top)
    rest = top + np.argsort(k, axis=1, kind="stable")[:, :sampled]  # (n, sampled)
    return np.concatenate([head, np.sort(rest, axis=1)], axis=1)


@torch.inference_mode()
def mine_split(model, inst: Instances, table, trie: PrefixTrie, beam: int, top: int, sampled: int, seed: int,
               batch_size: int, attributes: tuple[str, ...], desc: str, exclude_history: bool = False,
               keys: np.ndarray | None = None) -> pl.DataFrame:
    """Drafts and their labels for every instance of `inst`, M = top + sampled rows each.

    `keys` (N, beam): the random keys that pick the sampled drafts (default: drawn from `seed`).
    """
    stepper = BackboneStepper(model)
    if keys is None:
        keys = np.random.default_rng(seed).random((len(inst), beam))  # (N, beam) fixed per instance
    m = top + sampled
    n_items = table.codes.shape[0]
    parts = []
    with tqdm(total=len(inst), unit="inst", desc=desc, mininterval=5) as bar:
        for start in range(0, len(inst), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(inst)))
            part = inst.select(idx)
            exclude = history_mask(part.history.to(table.codes.device), n_items) if exclude_history else None
            res = beam_search(stepper, to_batch(part, table, with_target=False), trie, beam, exclude=exclude)
            valid = (res.items >= 0).cpu().numpy()  # (b, beam)
            picks = choose_candidates(valid, top, sampled, keys[start : start + len(idx)])
            pos = torch.from_numpy(picks).to(res.items.device)  # (b, M)
            items = res.items.gather(1, pos)  # (b, M)
            scores = res.scores.gather(1, pos)
            codes = table.codes[items]  # (b, M, L)
            tgt = part.target.to(items.device)
            tgt_codes = table.codes[tgt][:, None].expand_as(codes)  # (b, M, L)
            n_levels = codes.shape[-1]
            r_loc = first_divergence(codes.reshape(-1, n_levels), tgt_codes.reshape(-1, n_levels)).view(-1, m)
            cols = {
                "instance": np.repeat(idx.numpy(), m), "user_id": np.repeat(part.user.numpy(), m),
                "target": np.repeat(part.target.numpy(), m), "cand": np.tile(np.arange(m), len(idx)),
                "beam_rank": pos.reshape(-1).cpu().numpy(), "item": items.reshape(-1).cpu().numpy(),
                "score": scores.reshape(-1).float().cpu().numpy(),
                "codes": codes.reshape(-1, n_levels).cpu().numpy(), "r_loc": r_loc.reshape(-1).cpu().numpy(),
            }
            if attributes:
                a_item = table.attrs[items].reshape(-1, len(attributes))  # (b*M, K)
                a_tgt = table.attrs[tgt][:, None].expand(-1, m, -1).reshape(-1, len(attributes))
                sem = attribute_consistency(a_item, a_tgt).cpu().numpy()
                for k, name in enumerate(attributes):
                    cols[f"r_sem_{name}"] = sem[:, k]
            frame = pl.DataFrame({k: v for k, v in cols.items() if k != "codes"})
            frame = frame.with_columns(pl.Series("codes", cols["codes"].tolist(), dtype=pl.List(pl.Int64)))
            parts.append(frame)
            bar.update(len(idx))
    return pl.concat(parts).with_columns(pl.col("instance", "user_id", "target", "item", "beam_rank").cast(pl.Int64),
                                         pl.col("cand", "r_loc").cast(pl.Int32))


def include_target(frame: pl.DataFrame, codes: np.ndarray, attributes: tuple[str, ...]) -> pl.DataFrame:
    """Each instance whose drafts miss its target gets the target as its last candidate (module
    docstring); `codes` (N, L) the semantic IDs of all items. Rows stay in (instance, cand) order."""
    n_levels = codes.shape[1]
    hit = frame.group_by("instance").agg((pl.col("item") == pl.col("target")).any().alias("hit"))
    last = frame.group_by("instance").agg(pl.col("cand").max().alias("last"))
    swap = (frame.join(hit, on="instance").join(last, on="instance")
            .select((~pl.col("hit") & (pl.col("cand") == pl.col("last"))).alias("swap"))["swap"])
    target = frame["target"].to_numpy()
    new_codes = pl.Series("codes", codes[target].tolist(), dtype=pl.List(pl.Int64))
    out = frame.with_columns(
        pl.when(swap).then(pl.col("target")).otherwise(pl.col("item")).alias("item"),
        pl.when(swap).then(pl.lit(n_levels + 1, pl.Int32)).otherwise(pl.col("r_loc")).alias("r_loc"),
        pl.when(swap).then(pl.lit(-1, pl.Int64)).otherwise(pl.col("beam_rank")).alias("beam_rank"),
        pl.when(swap).then(pl.lit(float("nan"), pl.Float32)).otherwise(pl.col("score")).alias("score"),
        pl.when(swap).then(new_codes).otherwise(pl.col("codes")).alias("codes"),
        *[pl.when(swap).then(pl.lit(1, frame[f"r_sem_{a}"].dtype)).otherwise(pl.col(f"r_sem_{a}")).alias(f"r_sem_{a}")
          for a in attributes])
    return out


def label_distribution(frame: pl.DataFrame, n_levels: int, attributes: tuple[str, ...]) -> dict:
    """Share of each r_loc value (1..L+1), overall and for the top draft; attribute agreement rates."""
    n = frame.height
    counts = frame.group_by("r_loc").len()
    share = {int(r): 0.0 for r in range(1, n_levels + 2)}
    for r, c in counts.iter_rows():
        share[int(r)] = c / n
    top = frame.filter(pl.col("beam_rank") == 0)
    top_share = {int(r): 0.0 for r in range(1, n_levels + 2)}
    for r, c in top.group_by("r_loc").len().iter_rows():
        top_share[int(r)] = c / max(top.height, 1)
    return {"rows": n, "r_loc_share": share, "top1_r_loc_share": top_share,
            "attribute_agreement": {a: float(frame[f"r_sem_{a}"].mean()) for a in attributes}}


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p[k] - q.get(k, 0.0)) for k in p)


MapChunks = Callable[[Any, list[dict]], list]  # (task, calls) -> results in call order (flows/sharding.py)


@task(cache_policy=NO_CACHE)  # its input includes a function; nothing to cache
def mine_labels(params: Params, map_chunks: MapChunks | None = None) -> dict:
    """Label drafts of training and validation instances; with `map_chunks` (given by the flow when
    `mine.workers` > 1 or a Dask address is set) the beam searches run as `mine_chunk` tasks on Dask."""
    mn, out_dir = params.mine, params.dataset_dir()
    device = resolve_device(mn.device)
    attributes = params.dataset.attributes
    require_plain_backbone(out_dir, "the mine stage (its drafts are the backbone's beam)")
    table, trie, level_sizes, attr_sizes = item_index(out_dir, attributes, device)
    model = load_backbone(out_dir, device)
    n_levels = len(level_sizes)
    report, frames, cost = {}, {}, {}
    for split, limit in (("train", mn.max_instances), ("valid", mn.valid_instances)):
        inst = load_split(out_dir, split, params.data.max_history)
        chosen = subset(inst, limit, mn.seed)
        rows = _subset_rows(len(inst), limit, mn.seed) if limit and 0 < limit < len(inst) else np.arange(len(inst))
        t0 = time.perf_counter()
        seed = mn.seed + (split == "valid")
        if split == "train" and mn.crossfit_folds:
            frame, report["crossfit"] = mine_crossfit(params, inst, chosen, table, trie, level_sizes, attr_sizes, seed,
                                                      map_chunks)
        else:
            frame = draft(params, model, out_dir / "backbone" / "model.safetensors", chosen, table, trie, seed,
                          f"mine {split}", map_chunks)
        frame = frame.with_columns(pl.Series("instance", rows[frame["instance"].to_numpy()]))  # rows of the full split
        if split == "train" and mn.include_target:
            frame = include_target(frame, table.codes.cpu().numpy(), attributes)
        cost[split] = {"instances": len(chosen), "wall_s": round(time.perf_counter() - t0, 1),
                       "instances_per_s": round(len(chosen) / max(time.perf_counter() - t0, 1e-9), 1)}
        gate_labels(params, frame, split, n_levels, len(chosen), mn.top + mn.sampled, attributes)
        frames[split] = frame
        report[split] = label_distribution(frame, n_levels, attributes)
    for split, frame in frames.items():
        io.write_parquet(out_dir / "mine" / f"{split}.parquet", frame)
    report["r_loc_total_variation"] = total_variation(report["train"]["r_loc_share"], report["valid"]["r_loc_share"])
    report["cost"] = cost
    report["num_levels"] = n_levels
    report["attributes"] = list(attributes)
    return report


def draft(params: Params, model, weights: Path, inst: Instances, table, trie: PrefixTrie, seed: int, desc: str,
          map_chunks: MapChunks | None) -> pl.DataFrame:
    """`mine_split` over `inst`, here or in shards of `mine.shard_batches` batches on Dask: the same
    keys and the same batches either way, so the same labels."""
    mn = params.mine
    keys = np.random.default_rng(seed).random((len(inst), mn.beam))  # (N, beam) fixed per instance
    if map_chunks is None:
        set_threads(mn.threads)
        return mine_split(model, inst, table, trie, mn.beam, mn.top, mn.sampled, seed, mn.batch_size,
                          params.dataset.attributes, desc, params.data.exclude_history, keys=keys)
    step = mn.batch_size * mn.shard_batches
    starts = list(range(0, len(inst), step))
    digest = sha256_file(weights)  # once here, not in every shard: it keys the workers' model cache
    calls = [{"params": params, "weights": str(weights), "weights_sha256": digest, "inst": inst.select(torch.arange(a, min(a + step, len(inst)))),
              "keys": keys[a:a + step], "desc": f"{desc} shard {k + 1}/{len(starts)}"} for k, a in enumerate(starts)]
    parts = map_chunks(mine_chunk, calls)
    return pl.concat([p.with_columns(pl.col("instance") + a) for p, a in zip(parts, starts)])


_WORKER_STATE: dict[tuple, tuple] = {}  # per (Dask worker) process: the model, table and trie last used


@task(cache_policy=NO_CACHE)
def mine_chunk(params: Params, weights: str, weights_sha256: str, inst: Instances, keys: np.ndarray,
               desc: str) -> pl.DataFrame:
    """One shard of `draft`, in whatever process runs it; instance ids relative to the shard."""
    mn, out_dir = params.mine, params.dataset_dir()
    set_threads(mn.threads)
    key = (str(out_dir), weights, weights_sha256, mn.device)
    if key not in _WORKER_STATE:
        device = resolve_device(mn.device)
        table, trie, _, _ = item_index(out_dir, params.dataset.attributes, device)
        _WORKER_STATE.clear()
        _WORKER_STATE[key] = (load_backbone(out_dir, device, Path(weights)), table, trie)
    model, table, trie = _WORKER_STATE[key]
    return mine_split(model, inst, table, trie, mn.beam, mn.top, mn.sampled, 0, mn.batch_size,
                      params.dataset.attributes, desc, params.data.exclude_history, keys=keys)


def mine_crossfit(params: Params, train: Instances, chosen: Instances, table, trie: PrefixTrie,
                  level_sizes: list[int], attr_sizes: list[int], seed: int,
                  map_chunks: MapChunks | None = None) -> tuple[pl.DataFrame, dict]:
    """Drafts of `chosen` (a subset of `train`), each fold's by a backbone that never saw its users.

    Returns the frame (instance = row of `chosen`, as `mine_split` numbers them) and a report of
    the fold backbones (epochs, instances, validation Recall@10 on their held-out users).
    """
    mn, bb, out_dir = params.mine, params.backbone, params.dataset_dir()
    epochs = mn.crossfit_epochs or _stage_best_epoch(out_dir)
    cfg = replace(bb.train, epochs=epochs, patience=0, eval_every=epochs)
    folds = user_folds(train.user.numpy(), mn.crossfit_folds, mn.seed)
    chosen_folds = user_folds(chosen.user.numpy(), mn.crossfit_folds, mn.seed)
    valid_all = load_split(out_dir, "valid", params.data.max_history)
    valid_folds = user_folds(valid_all.user.numpy(), mn.crossfit_folds, mn.seed)
    fold_inputs = input_digests(params, "mine", ("splits", "items.parquet", "tokenizer"))  # hashed once, not per fold
    parts, info = [], []
    for f in range(mn.crossfit_folds):
        fit_idx = torch.from_numpy(np.flatnonzero(folds != f))
        held_valid = valid_all.select(torch.from_numpy(np.flatnonzero(valid_folds == f)))
        held_valid = subset(held_valid, bb.valid_users, bb.train.seed)
        work = out_dir / "mine" / "folds" / f"f{f}"
        fold_model, state = fit_backbone(params, train.select(fit_idx), held_valid, table, trie, level_sizes,
                                         attr_sizes, cfg, work / "ckpt",
                                         fingerprint(params, "mine", inputs=fold_inputs,
                                                     extra={"fold": f, "epochs": epochs}),
                                         desc=f"fold {f + 1}/{mn.crossfit_folds} ")
        mine_idx = np.flatnonzero(chosen_folds == f)
        if len(mine_idx):
            part = draft(params, fold_model, work / "ckpt" / "best" / "model.safetensors",
                         chosen.select(torch.from_numpy(mine_idx)), table, trie, seed + 1000 * (f + 1),
                         f"mine train fold {f + 1}", map_chunks)
            parts.append(part.with_columns(pl.Series("instance", mine_idx[part["instance"].to_numpy()])))
        info.append({"fold": f, "train_instances": int(len(fit_idx)), "mined_instances": int(len(mine_idx)),
                     "epochs": epochs, "held_out_valid_recall@10": state.best_metric,
                     "held_out_valid_users": len(held_valid)})
    frame = pl.concat(parts).sort("instance", "cand")
    return frame, {"folds": mn.crossfit_folds, "epochs": epochs, "fold_backbones": info}


def _stage_best_epoch(out_dir) -> int:
    state = json.loads((out_dir / "backbone" / "ckpt" / "best" / "trainer.json").read_text())["state"]
    return max(1, int(state["best_epoch"]))


def _subset_rows(n: int, limit: int, seed: int) -> np.ndarray:
    """The split rows `subset(inst, limit, seed)` keeps, in its order."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:limit].sort().values.numpy()


def gate_labels(params: Params, frame: pl.DataFrame, split: str, n_levels: int, n_instances: int, m: int,
                attributes: tuple[str, ...]) -> None:
    """Labels in range and exactly M candidates per instance, before anything is written."""
    gxe = gx_expectations()
    report_dir = params.reports_dir()
    checks = [
        gxe.ExpectColumnValuesToBeBetween(column="r_loc", min_value=1, max_value=n_levels + 1),
        gxe.ExpectColumnValuesToBeBetween(column="cand", min_value=0, max_value=m - 1),
        gxe.ExpectColumnValuesToNotBeNull(column="item"),
        gxe.ExpectColumnValuesToBeBetween(column="item", min_value=0),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["instance", "cand"]),
        *[gxe.ExpectColumnValuesToBeInSet(column=f"r_sem_{a}", value_set=[0, 1]) for a in attributes],
    ]
    run_gate(f"mine_{split}", frame.drop("codes"), checks, report_dir)
    per = frame.group_by("instance").len()
    run_gate(f"mine_{split}_counts", per, [
        gxe.ExpectColumnValuesToBeBetween(column="len", min_value=m, max_value=m),
        gxe.ExpectTableRowCountToEqual(value=n_instances),
    ], report_dir)
