"""A second SASRec in place of TIGER: is `tiger_cf` more than an ensemble of two models?

    python -m benchmarks.sasrec_pair --dataset ml-100k --dirs <run>/data ... --second <run'>/data ... \
        [--weights 0.25 0.5 1 2 4] --tag _ml100k_s2026-2030

`tiger_cf` fuses TIGER with the run's SASRec. Any second model fused with SASRec may lift it by
averaging out one model's errors, so the control is a second SASRec: the same architecture and
splits, another seed (`python -m flows.sasrec -S data.data_dir=<run'>/data -S sasrec.seed=<other>`
on a copy of the run's splits). Each `--dirs` run is paired with the `--second` run in the same
position. Over the whole catalog the pair scores log p_A(i) + w log p_B(i) (history items excluded
where `data.exclude_history`, as the evaluate stage does); each run's w is chosen on its validation
split from `--weights` by `tiger_cf`'s rule (`grc_core.metrics.choose_weight`).

It ranks the users the evaluate stage ranked (its `eval/sasrec.parquet` of each split). For every
run it writes per-user target ranks (top `--depth`, 0 beyond, as the evaluate stage
writes them) under `data/<dataset>/eval_pair/` and `eval_pair/valid/`: `sasrec_b` (the second
model alone), `sasrec_pair` at the chosen w, and the run's own `sasrec` and `tiger_cf` copied from
`eval/`. Its SASRec's ranks recomputed here must equal the evaluate stage's, or it stops (the pair
would be scored differently from the methods it is compared with). Then
`python -m benchmarks.seeds_table --dataset <d> --dirs <runs> --eval-subdir eval_pair --methods
sasrec sasrec_b sasrec_pair tiger_cf` (and `--methods sasrec_pair tiger_cf`) pairs them over seeds.

With `--tiger-cf` it also asks whether TIGER adds anything to the pair: `tiger_cf_pair` is
`tiger_cf` (the backbone's constrained beam of `evaluate.beam`, pruned on log pi + w V) whose
prefix value V is the pair's own distribution, softmax(log p_A + w_pair log p_B) at the pair's
chosen w_pair, in place of SASRec's; its w is chosen on validation from `evaluate.cf_weights` by
the same rule. Before that it decodes the run's plain `tiger_cf` on validation at the stage's
chosen weight and stops unless the ranks equal `eval/valid/tiger_cf.parquet`. The pipeline's own
form of it is the `sasrec` stage's ensemble (`sasrec_ensemble.seeds`, tasks/sasrec.py): with the
second SASRec as its member, the evaluate stage's `tiger_cf` and `sasrec_ens` rank every user as
`tiger_cf_pair` and `sasrec_pair` do here (RESULTS.md "TIGER on top of the pair").
Writes benchmarks/results/sasrec_pair_<dataset><tag>.json (each run's weights and validation scores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.cf_fusion import masked_log_probs
from benchmarks.common import check_stage_ranks, commit, copy_stage_ranks, save, stage_users, stamp
from grc_core import metrics as M
from grc_core.data import Instances
from grc_core.evaluation import rank_with_backbone
from grc_core.sasrec import fuse_log_probs, top_by_log_probs
from tasks.artifacts import (backbone_cf_mode, item_index, load_backbone, load_baseline, sasrec_log_probs,
                             tiger_cf_weight)
from tasks.evaluate import save_ranks
from tasks.params import load_params

SUBDIR = "eval_pair"


def fused_ranks(logp_a: torch.Tensor, logp_b: torch.Tensor, targets: np.ndarray, weight: float,
                depth: int) -> np.ndarray:
    """1-based rank of each target under log p_A + w log p_B (U, N), ties to the smaller item id;
    0 where it is beyond `depth` or excluded (-inf)."""
    ranked, _ = top_by_log_probs(logp_a + weight * logp_b if weight else logp_a, depth)  # (U, depth)
    return M.target_ranks(ranked, targets)


def tiger_cf_ranks(params, inst: Instances, item_logp, weight: float) -> np.ndarray:
    """Target ranks of the backbone's constrained beam (`evaluate.beam`) steered by `item_logp`'s
    prefix value at `weight`, decoded as the evaluate stage decodes `tiger_cf`."""
    out_dir, ev = params.dataset_dir(), params.evaluate
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    items, _ = rank_with_backbone(load_backbone(out_dir), inst, table, trie, ev.beam, ev.batch_size, None,
                                  params.data.exclude_history, item_logp, weight, backbone_cf_mode(out_dir))
    return M.target_ranks(items, inst.target.numpy())


def tiger_cf_pair(params, inst: Instances, split: str, a, b, row: dict) -> np.ndarray:
    """`tiger_cf_pair`'s ranks on `split`: on validation at every `evaluate.cf_weights` (the choice
    recorded in `row`), after checking the plain `tiger_cf` recomputes the stage's ranks; on test
    at the chosen weight."""
    out_dir, ev = params.dataset_dir(), params.evaluate
    prior = lambda part: fuse_log_probs(a(part), [b(part)], row["weight"])  # noqa: E731 (the pair's distribution)
    if split == "test":
        return tiger_cf_ranks(params, inst, prior, row["tiger_cf_pair_weight"])
    check_stage_ranks(out_dir, split, "tiger_cf", inst.user.numpy(),
                      tiger_cf_ranks(params, inst, a, tiger_cf_weight(out_dir, ev.cf_weights)),
                      "tiger_cf_pair would not be decoded like tiger_cf")
    ranked = {float(w): tiger_cf_ranks(params, inst, prior, float(w)) for w in ev.cf_weights}
    choice = M.choose_weight(ranked)
    row["tiger_cf_pair_weight"] = choice["chosen"]
    row["tiger_cf_pair_valid_recall@10"] = {str(r["weight"]): r["recall@10"] for r in choice["valid"]}
    return ranked[choice["chosen"]]


def pair_run(data_dir: Path, second_dir: Path, dataset: str, weights: list[float], depth: int, batch: int,
             overrides: list[str], with_tiger: bool = False) -> dict:
    """Rank one run's validation and test users with the pair (and `tiger_cf_pair` where
    `with_tiger`); write its eval_pair/ folder."""
    params = load_params(overrides=[*overrides, f"data.dataset={dataset}", f"data.data_dir={data_dir}"])
    out_dir, second = params.dataset_dir(), Path(second_dir) / dataset
    excl = params.data.exclude_history
    a, b = sasrec_log_probs(load_baseline(out_dir)), sasrec_log_probs(load_baseline(second))
    row: dict = {"dir": str(data_dir), "second": str(second_dir)}
    for split in ("valid", "test"):
        inst = stage_users(out_dir, split, params.data.max_history)
        users, targets = inst.user.numpy(), inst.target.numpy()
        grid = [0.0, *weights] if split == "valid" else [0.0, row["weight"]]
        by_w: dict[float, list[np.ndarray]] = {w: [] for w in grid}
        alone_b = []
        for start in range(0, len(inst), batch):  # users in batches: (U, N) matrices stay small
            part = inst.select(torch.arange(start, min(start + batch, len(inst))))
            logp_a, logp_b = masked_log_probs(a, part, batch, excl), masked_log_probs(b, part, batch, excl)
            t = targets[start:start + batch]
            for w in grid:
                by_w[w].append(fused_ranks(logp_a, logp_b, t, w, depth))
            alone_b.append(fused_ranks(logp_b, logp_a, t, 0.0, depth))
        ranked = {w: np.concatenate(r) for w, r in by_w.items()}
        check_stage_ranks(out_dir, split, "sasrec", users, ranked.pop(0.0),
                          "the pair would not be scored like the methods it is compared with")
        if split == "valid":  # the evaluate stage's rule for tiger_cf's weight
            choice = M.choose_weight(ranked)
            row["weight"] = choice["chosen"]
            row["valid_recall@10"] = {str(r["weight"]): r["recall@10"] for r in choice["valid"]}
        for name, r in (("sasrec_b", np.concatenate(alone_b)), ("sasrec_pair", ranked[row["weight"]])):
            save_ranks(out_dir, name, users, r, split, root=SUBDIR)
        if with_tiger:
            save_ranks(out_dir, "tiger_cf_pair", users, tiger_cf_pair(params, inst, split, a, b, row), split,
                       root=SUBDIR)
        copy_stage_ranks(out_dir, split, SUBDIR, ("sasrec", "tiger_cf"))
    print(f"{data_dir}: w {row['weight']}, validation R@10 {row['valid_recall@10']}"
          + (f"; tiger_cf_pair w {row['tiger_cf_pair_weight']}, validation R@10 {row['tiger_cf_pair_valid_recall@10']}"
             if with_tiger else ""), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--dirs", nargs="+", required=True, help="data dirs of the runs (each with sasrec/ and eval/)")
    ap.add_argument("--second", nargs="+", required=True, help="data dirs of the second SASRecs, one per run, in order")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--depth", type=int, default=200, help="ranks kept (the evaluate stage's beam)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tiger-cf", action="store_true",
                    help="also rank tiger_cf_pair: tiger_cf steered by the pair's distribution")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    if len(a.second) != len(a.dirs):
        raise SystemExit(f"--second names {len(a.second)} data dirs for {len(a.dirs)} runs: give one per run, in order")
    if any(w <= 0 for w in a.weights):
        raise SystemExit("--weights must be > 0 (w 0 is SASRec alone, reported as `sasrec`)")
    runs = [pair_run(Path(d), Path(s), a.dataset, a.weights, a.depth, a.batch, a.set, a.tiger_cf)
            for d, s in zip(a.dirs, a.second)]
    report = {**stamp({"weights": a.weights, "depth": a.depth, "overrides": a.set,
                                                            "tiger_cf": a.tiger_cf}), "commit": commit(),
              "dataset": a.dataset, "runs": runs}
    save(f"sasrec_pair_{a.dataset}{a.tag}", report)
    return report


if __name__ == "__main__":
    main()
