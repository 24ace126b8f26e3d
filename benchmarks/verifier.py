"""The reflection as a verifier, and SASRec's prefix value inside GRC decoding (issue 16, parts 3c and 4).

    python -m benchmarks.verifier [-S data.data_dir=...] [--methods grc_sft] [--gammas 0 0.5 1 2 4 8]
                                  [--cf-weights 2 4 8] [--tag _x]

For each GRC method (a trained template model under data/<dataset>/):
1. Validation (all users, or `--valid-users`): one decode with every draft reflected on gives the
   backbone-order drafts (beam `--beam`) and the verifier's log q_b = log p(r_loc = L+1 | b).
   - AUC of q_b for "draft b is the target", over every draft of every user and over the top 10
     (the Mann-Whitney statistic, ties counted half);
   - `rank_rule: verify` at each gamma: the drafts re-ordered by score_b + gamma log q_b (the
     same re-ordering `grc_core.grc.verify_order` does, applied to the one decode);
   - the two-pass decode under `evaluate.rank_rule` (the method as evaluated), and with SASRec's
     prefix value in both passes at each `--cf-weights` w (`evaluate.grc_cf_weight`).
2. gamma, and w, are chosen on validation Recall@10 (then NDCG@10, then the smaller value).
3. Test: each chosen configuration decoded once; paired bootstrap tests against SASRec and TIGER
   (their test ranks from the same run's `eval/`), 95% intervals.
Writes benchmarks/results/verifier_<dataset><tag>.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import polars as pl
import torch

from benchmarks.common import commit, save, stamp
from grc_core import metrics as M
from grc_core.data import to_batch
from grc_core.evaluation import history_mask, rank_with_grc
from grc_core.grc import grc_decode
from tasks.artifacts import (decode_config, item_index, load_baseline, load_grc, load_split, sasrec_log_probs,
                             subset)
from tasks.params import load_params

KS = (5, 10, 20, 50, 100, 200)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.inference_mode()
def drafts_and_verifier(model, inst, table, trie, beam: int, batch: int, exclude_history: bool, decode):
    """Backbone-order drafts (U, W), their scores and log q (U, W) of every user."""
    cfg = replace(decode, width=beam, rank_rule="verify", verify_gamma=0.0, reflect_width=0, cf_weight=0.0)
    items, scores, log_q = [], [], []
    for start in range(0, len(inst), batch):
        part = inst.select(torch.arange(start, min(start + batch, len(inst))))
        excl = history_mask(part.history, table.codes.shape[0]) if exclude_history else None
        res = grc_decode(model, to_batch(part, table, with_target=False), trie, cfg, excl)
        items.append(res.drafts.items.numpy())
        scores.append(res.drafts.scores.float().numpy())
        log_q.append(res.log_right.float().numpy())
    return np.concatenate(items), np.concatenate(scores), np.concatenate(log_q)


def verify_rank(items: np.ndarray, scores: np.ndarray, log_q: np.ndarray, gamma: float) -> np.ndarray:
    key = np.where(items >= 0, scores + gamma * np.maximum(log_q, -1e4), -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")
    return np.take_along_axis(items, order, 1)


def per_user(ranked: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    return M.per_user_metrics(M.target_ranks(ranked, targets), KS, (5, 10))


def summary(pu: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in pu.items()}


def choose(scored: dict[float, dict]) -> float:
    return max(scored, key=lambda v: (scored[v]["recall@10"], scored[v]["ndcg@10"], -v))


def base_ranks(out_dir, method: str, users: np.ndarray) -> np.ndarray | None:
    path = out_dir / "eval" / f"{method}.parquet"
    if not path.exists():
        return None
    frame = pl.read_parquet(path)
    lookup = dict(zip(frame["user_id"].to_list(), frame["rank"].to_list()))
    if not all(int(u) in lookup for u in users):
        return None
    return np.array([lookup[int(u)] for u in users])


def against_references(out_dir, users: np.ndarray, pus: dict[str, dict], n_boot: int,
                       names=("sasrec", "tiger", "tiger_cf")) -> dict:
    """Each reference method whose test ranks in the run's eval/ cover `users`: its metrics
    (`<name>_metrics`) and the paired bootstrap of every ranking in `pus` against it (`paired`)."""
    out: dict = {"paired": {}}
    for name in names:
        ranks = base_ranks(out_dir, name, users)
        if ranks is None:
            continue
        ref = M.per_user_metrics(ranks, KS, (5, 10))
        out[f"{name}_metrics"] = summary(ref)
        out["paired"][name] = {k: {m: M.paired_bootstrap(ref[m], v[m], n_boot, 0) for m in ("recall@10", "ndcg@10")}
                               for k, v in pus.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--methods", nargs="+", default=["grc_sft"])
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--cf-weights", type=float, nargs="*", default=[2.0, 4.0, 8.0])
    ap.add_argument("--beam", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--valid-users", type=int, default=0)
    ap.add_argument("--test-users", type=int, default=0,
                    help="test users (0: all), the fixed subset `evaluate.users` with the same count would rank")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    params = load_params(overrides=args.set)
    out_dir, ev = params.dataset_dir(), params.evaluate
    excl = params.data.exclude_history
    report = stamp({"methods": args.methods, "gammas": args.gammas, "cf_weights": args.cf_weights, "beam": args.beam,
                    "overrides": args.set, "valid_users": args.valid_users,
                    "test_users": args.test_users, "rank_rule": ev.rank_rule})
    report["commit"] = commit()
    report["params_hash"] = params.section_hash("data", "mine", "sft", "evaluate")
    report["dataset"] = params.data.dataset
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    valid = subset(load_split(out_dir, "valid", params.data.max_history), args.valid_users, ev.users_seed)
    test = subset(load_split(out_dir, "test", params.data.max_history), args.test_users, ev.users_seed)
    item_logp = sasrec_log_probs(load_baseline(out_dir)) if args.cf_weights else None
    base = replace(decode_config(ev, args.beam, params.vstar.ved_test), cf_weight=0.0)  # the method as evaluate decodes it
    results = {}
    for method in args.methods:
        model = load_grc(out_dir, method)
        r: dict = {"valid": {}, "test": {}}
        # 1. validation
        t0 = time.perf_counter()
        items, scores, log_q = drafts_and_verifier(model, valid, table, trie, args.beam, args.batch, excl, base)
        r["valid"]["verify_decode_s"] = round(time.perf_counter() - t0, 1)
        tv = valid.target.numpy()
        live = items >= 0
        is_target = items == tv[:, None]
        r["valid"]["auc_all"] = auc(log_q[live], is_target[live])
        top = live.copy()
        top[:, 10:] = False
        r["valid"]["auc_top10"] = auc(log_q[top], is_target[top])
        r["valid"]["target_in_drafts"] = float(is_target.any(1).mean())
        r["valid"]["mean_q_target"] = float(np.exp(log_q[is_target]).mean()) if is_target.any() else float("nan")
        r["valid"]["mean_q_other"] = float(np.exp(log_q[live & ~is_target]).mean())
        r["valid"]["verify"] = {g: summary(per_user(verify_rank(items, scores, log_q, g), tv)) for g in args.gammas}
        gamma = choose(r["valid"]["verify"])
        r["valid"]["gamma"] = gamma
        t0 = time.perf_counter()
        ranked, _ = rank_with_grc(model, valid, table, trie, base, args.batch, exclude_history=excl)
        r["valid"]["two_pass_s"] = round(time.perf_counter() - t0, 1)
        r["valid"]["two_pass"] = summary(per_user(ranked, tv))
        cf = {0.0: r["valid"]["two_pass"]}
        for w in args.cf_weights:
            ranked, _ = rank_with_grc(model, valid, table, trie, replace(base, cf_weight=w), args.batch,
                                      exclude_history=excl, item_logp=item_logp)
            cf[w] = summary(per_user(ranked, tv))
        r["valid"]["grc_cf"] = cf
        w_cf = choose(cf)
        r["valid"]["cf_weight"] = w_cf
        print(method, "valid AUC", round(r["valid"]["auc_all"], 4), "gamma", gamma,
              {g: round(v["recall@10"], 4) for g, v in r["valid"]["verify"].items()}, "cf", w_cf,
              {w: round(v["recall@10"], 4) for w, v in cf.items()}, flush=True)
        # 3. test, once per chosen configuration
        tt = test.target.numpy()
        items, scores, log_q = drafts_and_verifier(model, test, table, trie, args.beam, args.batch, excl, base)
        live, is_target = items >= 0, items == tt[:, None]
        r["test"]["auc_all"] = auc(log_q[live], is_target[live])
        pus = {"drafts (gamma 0)": per_user(verify_rank(items, scores, log_q, 0.0), tt),
               f"verify (gamma {gamma})": per_user(verify_rank(items, scores, log_q, gamma), tt)}
        ranked, _ = rank_with_grc(model, test, table, trie, base, args.batch, exclude_history=excl)
        pus[f"two-pass {ev.rank_rule}"] = per_user(ranked, tt)
        if w_cf > 0:
            ranked, _ = rank_with_grc(model, test, table, trie, replace(base, cf_weight=w_cf), args.batch,
                                      exclude_history=excl, item_logp=item_logp)
            pus[f"two-pass {ev.rank_rule} + V_cf (w {w_cf})"] = per_user(ranked, tt)
        r["test"]["metrics"] = {k: summary(v) for k, v in pus.items()}
        r["test"]["ci95"] = {k: {m: M.bootstrap_interval(v[m], args.bootstrap, 0) for m in ("recall@10", "ndcg@10")}
                             for k, v in pus.items()}
        r["test"].update(against_references(out_dir, test.user.numpy(), pus, args.bootstrap))
        print(method, "test", {k: round(v["recall@10"], 4) for k, v in r["test"]["metrics"].items()}, flush=True)
        results[method] = r
    report["methods"] = results
    save(f"verifier_{params.data.dataset}{args.tag}", report)
    return report


if __name__ == "__main__":
    main()
