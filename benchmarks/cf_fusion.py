"""The collaborative prefix value in TIGER's beam (`tiger_cf`) against SASRec, TIGER and two late
fusions of their finished lists; every weight chosen on the validation split, the test split read
once per chosen configuration.

    python -m benchmarks.cf_fusion [-S data.dataset=ml-100k] [-S data.data_dir=...] [--weights 0 0.5 1 2 4] [--tag _cf]

Reads the stage outputs under data/<dataset>/ (backbone, sasrec, tokenizer, splits). Methods:
- `sasrec`: SASRec's top `--beam` logits; `tiger`: the backbone's beam of `--beam`;
- `tiger_cf@w`: the beam pruned on log pi(y<=l) + w V_cf(y<=l) at every level (grc_core/cf_value.py);
- `rrf`: reciprocal-rank fusion of the two lists, 1/(60 + rank) summed (items absent from a list
  get nothing from it);
- `linear@w`: TIGER's beam list re-ranked by log pi(item) + w log p_SASRec(item).
For each weighted method the weight with the best validation Recall@10 (then NDCG@10, then the
smaller weight) is kept; the test split then ranks sasrec, tiger, tiger_cf, rrf and linear at
those weights, with paired bootstrap tests against SASRec and against the better late fusion
(chosen on validation). Also: the share of users whose top item shares the target's first code
(TIGER's "first-code hit rate"), and users/s of tiger_cf against tiger in the same run.
Writes benchmarks/results/cf_fusion_<dataset><tag>.json; with `--save-ranks` also each method's
per-user test ranks under data/<dataset>/eval_fusion/ (`late_fusion` is the one chosen on
validation), which `benchmarks.seeds_table --eval-subdir eval_fusion` pairs over seeds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl
import torch

from benchmarks.common import commit, save, stamp
from grc_core import metrics as M
from grc_core.evaluation import history_mask, rank_with_backbone
from tasks import io
from tasks.artifacts import (item_index, load_backbone, load_baseline, load_split, sasrec_log_probs,
                             sasrec_top, subset)
from tasks.params import load_params

RRF_K = 60
PARAM_SECTIONS = ("data", "backbone", "sasrec", "evaluate")  # the params sections a run's ranks depend on


def metrics_of(ranked: np.ndarray, targets: np.ndarray) -> tuple[dict, dict]:
    ranks = M.target_ranks(ranked, targets)
    per_user = M.per_user_metrics(ranks, (5, 10, 20, 50, 100, 200), (5, 10))
    return {k: float(v.mean()) for k, v in per_user.items()}, per_user


def late_fusions(tiger_items, tiger_scores, sas_logp: torch.Tensor, sas_items, width: int, weights):
    """RRF of the two lists, and TIGER's list re-ranked by log pi + w log p_SASRec, for each w."""
    u = tiger_items.shape[0]
    rrf = np.full((u, width), -1, np.int64)
    for row in range(u):
        score: dict[int, float] = {}
        for items in (tiger_items[row], sas_items[row]):
            for r, item in enumerate(items.tolist()):
                if item >= 0:
                    score[item] = score.get(item, 0.0) + 1.0 / (RRF_K + r + 1)
        best = sorted(score, key=lambda i: (-score[i], i))[:width]
        rrf[row, :len(best)] = best
    linear = {}
    safe = np.where(tiger_items >= 0, tiger_items, 0)
    sas = np.take_along_axis(sas_logp.numpy(), safe, 1)  # (U, W) SASRec log-prob of each beam item
    for w in weights:
        fused = np.where(tiger_items >= 0, tiger_scores + w * sas, -np.inf)
        order = np.argsort(-fused, axis=1, kind="stable")
        linear[w] = np.take_along_axis(tiger_items, order, 1)
    return rrf, linear


def masked_log_probs(item_logp, inst, batch: int, exclude_history: bool) -> torch.Tensor:
    """SASRec's log-probabilities over the catalog for every instance (U, N), in batches; the
    user's history items -inf where `exclude_history` (as the beam and `sasrec_top` exclude them)."""
    logp = torch.cat([item_logp(inst.select(torch.arange(a, min(a + batch, len(inst)))))
                      for a in range(0, len(inst), batch)])  # (U, N)
    if exclude_history:
        logp = logp.masked_fill(history_mask(inst.history, logp.shape[1]), float("-inf"))
    return logp


def first_code_hits(ranked: np.ndarray, targets: np.ndarray, codes: np.ndarray) -> float:
    top = ranked[:, 0]
    ok = top >= 0
    return float((ok & (codes[np.where(ok, top, 0), 0] == codes[targets, 0])).mean())


def rank_all(params, split: str, n_users: int, weights, beam: int, batch: int, linear_weights=None) -> dict:
    """Every method on `n_users` of `split`: tiger_cf at each of `weights`, the linear fusion at each
    of `linear_weights` (default: the same)."""
    out_dir = params.dataset_dir()
    inst = subset(load_split(out_dir, split, params.data.max_history), n_users, params.evaluate.users_seed)
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    backbone, sasrec = load_backbone(out_dir), load_baseline(out_dir)
    excl = params.data.exclude_history
    item_logp = sasrec_log_probs(sasrec)
    out = {"targets": inst.target.numpy(), "codes": table.codes.numpy(), "users": len(inst),
           "user_ids": inst.user.numpy()}
    t0 = time.perf_counter()
    out["tiger"] = rank_with_backbone(backbone, inst, table, trie, beam, batch, exclude_history=excl)
    out["tiger_s"] = time.perf_counter() - t0
    for w in weights:
        t0 = time.perf_counter()
        out[f"tiger_cf@{w}"] = rank_with_backbone(backbone, inst, table, trie, beam, batch, exclude_history=excl,
                                                  item_logp=item_logp, cf_weight=w)
        out[f"tiger_cf@{w}_s"] = time.perf_counter() - t0
    out["sasrec"] = sasrec_top(sasrec, inst, beam, batch, excl)
    logp = masked_log_probs(item_logp, inst, batch, excl)  # (U, N)
    rrf, linear = late_fusions(out["tiger"][0], out["tiger"][1], logp, out["sasrec"][0], beam,
                               weights if linear_weights is None else linear_weights)
    out["rrf"] = (rrf, None)
    out.update({f"linear@{w}": (v, None) for w, v in linear.items()})
    return out


def choose(valid: dict, prefix: str, weights) -> float:
    scored = [(valid[f"{prefix}@{w}"]["recall@10"], valid[f"{prefix}@{w}"]["ndcg@10"], -w, w) for w in weights]
    return max(scored)[3]


def chosen_on_valid(valid: dict, weights) -> dict:
    """The validation choices: `tiger_cf`'s and the linear fusion's weights, and the late fusion
    reported (`rrf` where its (Recall@10, NDCG@10) is at least the linear fusion's at its weight)."""
    w_cf, w_lin = choose(valid, "tiger_cf", weights), choose(valid, "linear", weights)
    lin = valid[f"linear@{w_lin}"]
    late = "rrf" if (valid["rrf"]["recall@10"], valid["rrf"]["ndcg@10"]) >= (lin["recall@10"], lin["ndcg@10"]) \
        else "linear"
    return {"tiger_cf": w_cf, "linear": w_lin, "late_fusion": late}


def method_keys(chosen: dict) -> dict[str, str]:
    """Each reported method's key in `rank_all`'s result at the chosen weights (`late_fusion`: the
    chosen one's)."""
    keys = {"sasrec": "sasrec", "tiger": "tiger", "tiger_cf": f"tiger_cf@{chosen['tiger_cf']}", "rrf": "rrf",
            "linear": f"linear@{chosen['linear']}"}
    return {**keys, "late_fusion": keys[chosen["late_fusion"]]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--beam", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--valid-users", type=int, default=0, help="validation users (0: all)")
    ap.add_argument("--test-users", type=int, default=0, help="test users (0: all)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tag", default="", help="suffix of the JSON's name")
    ap.add_argument("--save-ranks", action="store_true",
                    help="write each method's per-user test ranks to data/<dataset>/eval_fusion/<method>.parquet "
                         "(late_fusion: the one chosen on validation), for benchmarks.seeds_table --eval-subdir")
    args = ap.parse_args(argv)
    params = load_params(overrides=args.set)
    weights = [w for w in args.weights if w > 0]
    report = stamp({"weights": weights, "beam": args.beam, "rrf_k": RRF_K, "overrides": args.set,
                    "valid_users": args.valid_users, "test_users": args.test_users})
    report["commit"] = commit()
    report["params_hash"] = params.section_hash(*PARAM_SECTIONS)
    report["dataset"] = params.data.dataset

    valid = rank_all(params, "valid", args.valid_users, weights, args.beam, args.batch)
    vm = {name: metrics_of(valid[name][0], valid["targets"])[0] for name in valid
          if isinstance(valid[name], tuple)}
    chosen = chosen_on_valid(vm, weights)
    w_cf, w_lin, late = chosen["tiger_cf"], chosen["linear"], chosen["late_fusion"]
    report["valid"] = {"users": valid["users"], "metrics": vm, "chosen": chosen,
                       "first_code_hit": {name: first_code_hits(valid[name][0], valid["targets"], valid["codes"])
                                          for name in ("tiger", f"tiger_cf@{w_cf}", "sasrec")}}
    print("validation:", {k: round(v["recall@10"], 4) for k, v in vm.items()}, "chosen", report["valid"]["chosen"],
          flush=True)

    test = rank_all(params, "test", args.test_users, [w_cf], args.beam, args.batch, linear_weights=[w_lin])
    keys = method_keys(chosen)
    names = {label: key for label, key in keys.items() if label != "late_fusion"}
    per_user, tm = {}, {}
    for label, name in names.items():
        tm[label], per_user[label] = metrics_of(test[name][0], test["targets"])
    if args.save_ranks:
        for label, name in keys.items():
            io.write_parquet(params.dataset_dir() / "eval_fusion" / f"{label}.parquet", pl.DataFrame(
                {"user_id": test["user_ids"].astype(np.int64),
                 "rank": M.target_ranks(test[name][0], test["targets"]).astype(np.int64)}))
    paired = {}
    for label in names:
        paired[label] = {f"vs_{base}": {k: M.paired_bootstrap(per_user[base][k], per_user[label][k], args.bootstrap, 0)
                                        for k in ("recall@10", "ndcg@10")}
                         for base in ("sasrec", late) if base != label}
    report["test"] = {"users": test["users"], "metrics": tm, "paired": paired,
                      "ci95": {label: {k: M.bootstrap_interval(per_user[label][k], args.bootstrap, 0)
                                       for k in ("recall@10", "ndcg@10")} for label in names},
                      "first_code_hit": {label: first_code_hits(test[names[label]][0], test["targets"], test["codes"])
                                         for label in ("tiger", "tiger_cf", "sasrec")}}
    report["cost"] = {"users": test["users"], "beam": args.beam, "tiger_users_per_s": test["users"] / test["tiger_s"],
                      "tiger_cf_users_per_s": test["users"] / test[f"tiger_cf@{w_cf}_s"]}
    save(f"cf_fusion_{params.data.dataset}{args.tag}", report)
    return {**report, "_tiger_test_per_user": per_user["tiger"]}  # for callers' paired tests; not in the JSON


if __name__ == "__main__":
    main()
