"""Mine reflection labels from the backbone's beams (GRC paper Sec. 4.1.1).

For each instance the trained backbone's constrained beam search (width `mine.beam`) proposes
drafts; we keep the `mine.top` best beams and `mine.sampled` more drawn uniformly from the
rest of the beam (a fixed seed), so that SFT also sees the deeper, mostly wrong drafts that
two-pass inference corrects at beam 200. Each kept draft gets
- r_loc in 1..L+1: the first level where its ID differs from the target's (Eq. 4; L+1 = correct);
- one r_sem per attribute of `datasets.<ds>.attributes`: 1 if the draft item's bucket equals the
  target item's (Eq. 5). Bucket 0 ("unknown") is a value like any other: two items of unknown
  brand agree on brand.

Outputs `data/<dataset>/mine/{train,valid}.parquet`, one row per (instance, candidate):
instance (row in the split), user_id, target, cand (0..M-1), beam_rank, item, score, codes
(list), r_loc, and r_sem_<attribute> per attribute. `reports/<dataset>/mine.json` compares
the label distributions on mined training instances and on validation instances.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import torch
from prefect import task
from tqdm.auto import tqdm

from grc_core.beam_search import beam_search
from grc_core.data import Instances, to_batch
from grc_core.device import resolve_device
from grc_core.evaluation import history_mask
from grc_core.model import BackboneStepper
from grc_core.rewards import attribute_consistency, first_divergence
from grc_core.trie import PrefixTrie
from tasks import io
from tasks.backbone import load_backbone, load_item_table, load_split, subset
from tasks.params import Params
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
               batch_size: int, attributes: tuple[str, ...], desc: str, exclude_history: bool = False) -> pl.DataFrame:
    """Drafts and their labels for every instance of `inst`, M = top + sampled rows each."""
    stepper = BackboneStepper(model)
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


@task
def mine_labels(params: Params) -> dict:
    mn, out_dir = params.mine, params.dataset_dir()
    device = resolve_device(mn.device)
    attributes = params.dataset.attributes
    table, level_sizes, _ = load_item_table(out_dir, attributes)
    table = table.to(device)
    trie = PrefixTrie.from_ids(table.codes.cpu().numpy(), level_sizes).to(device)
    model = load_backbone(out_dir, device)
    n_levels = len(level_sizes)
    report, frames, cost = {}, {}, {}
    for split, limit in (("train", mn.max_instances), ("valid", mn.valid_instances)):
        inst = load_split(out_dir, split, params.data.max_history)
        chosen = subset(inst, limit, mn.seed)
        t0 = time.perf_counter()
        frame = mine_split(model, chosen, table, trie, mn.beam, mn.top, mn.sampled, mn.seed + (split == "valid"),
                           mn.batch_size, attributes, f"mine {split}", params.data.exclude_history)
        if limit and 0 < limit < len(inst):  # map back to rows of the full split
            rows = _subset_rows(len(inst), limit, mn.seed)
            frame = frame.with_columns(pl.Series("instance", rows[frame["instance"].to_numpy()]))
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
