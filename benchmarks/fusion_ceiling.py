"""How much more can be had by re-ranking `tiger_cf`'s candidates with what TIGER and SASRec say
of them? A diagnostic on the validation split only (the test split is not read).

    python -m benchmarks.fusion_ceiling [-S ...] [--users 6000] [--weight 1] [--tag _ids_prebuilt]

`tiger_cf` (grc_core/cf_value.py) ranks its beam by log pi(item) + w log p_SASRec(item), one
weight for every user and every item. This script decodes that beam once for `--users`
validation users (`evaluate.users_seed`'s fixed subset, history excluded), splits the users in
two seeded halves, chooses or fits each re-ranker of the same candidates on the first half
("fit") and reads it on the second ("check"), paired against `tiger_cf` as decoded:
- `final`: log pi + w_f log p_SASRec, w_f from a grid (a second weight for the last level);
- `adaptive:<feature>`: log pi + w_f exp(beta z_u) log p_SASRec, a per-user weight from one
  standardised user feature z_u (SASRec's entropy or top-1 log-probability, the entropy of TIGER's
  beam, the history length, TIGER's minus SASRec's entropy), (w_f, beta) from a grid;
- `stacker`: a linear listwise ranker (softmax cross-entropy over each user's candidates, users
  whose target is among them, L-BFGS) on log pi, log p_SASRec, log(1 + beam position), log(1 +
  SASRec rank among its top `--beam`), and each user feature times log pi and times log p_SASRec.
Also the ceiling every re-ranker shares: the share of users whose target is among the candidates
(`ceiling_recall@10`, tiger_cf's recall at the beam's width).
Writes benchmarks/results/fusion_ceiling_<dataset><tag>.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.cf_fusion import masked_log_probs
from benchmarks.common import commit, save, stamp
from grc_core import metrics as M
from grc_core.evaluation import rank_with_backbone
from tasks.artifacts import (item_index, load_backbone, load_baseline, load_split, sasrec_log_probs, subset,
                             tiger_cf_weight)
from tasks.params import load_params

FINAL_WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0)
ADAPT_WEIGHTS = (0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
BETAS = (-1.0, -0.5, -0.25, 0.25, 0.5, 1.0)
PAD = -50.0  # log-score of a padded candidate slot in the stacker's features (never ranked: masked)


def candidates(params, n_users: int, weight: float, beam: int, batch: int) -> dict[str, np.ndarray]:
    """`tiger_cf`'s beam for n_users validation users: items (U, W), log pi and log p_SASRec of each,
    SASRec's top-`beam` log-probabilities (U, W) and the targets (U,)."""
    out_dir = params.dataset_dir()
    inst = subset(load_split(out_dir, "valid", params.data.max_history), n_users, params.evaluate.users_seed)
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    item_logp = sasrec_log_probs(load_baseline(out_dir))
    excl = params.data.exclude_history
    t0 = time.perf_counter()
    items, fused = rank_with_backbone(load_backbone(out_dir), inst, table, trie, beam, batch, exclude_history=excl,
                                      item_logp=item_logp, cf_weight=weight)
    decode_s = time.perf_counter() - t0
    logp = masked_log_probs(item_logp, inst, batch, excl).numpy()  # (U, N)
    sas = np.take_along_axis(logp, np.where(items >= 0, items, 0), 1)  # (U, W)
    # the beam's last level scores log pi + w * log p_SASRec (cf_value.prefix_values' last level)
    return {"items": items, "logpi": fused - weight * sas, "sas": sas, "targets": inst.target.numpy(),
            "sas_top": -np.sort(-logp, 1)[:, :beam], "hist_len": (inst.history.numpy() >= 0).sum(1),
            "sas_entropy": entropy(logp), "decode_s": np.float64(decode_s)}


def entropy(logp: np.ndarray) -> np.ndarray:
    """Entropy of each row's distribution softmax(logp) (U,); -inf entries carry no mass."""
    top = logp.max(1, keepdims=True)
    logq = logp - (top + np.log(np.exp(logp - top).sum(1, keepdims=True)))  # (U, N) log-softmax
    q = np.exp(logq)
    return -(q * np.where(q > 0, logq, 0.0)).sum(1)


def user_features(c: dict) -> dict[str, np.ndarray]:
    tiger_entropy = entropy(np.where(c["items"] >= 0, c["logpi"], -np.inf))
    return {"sas_entropy": c["sas_entropy"], "sas_top1": c["sas_top"][:, 0], "tiger_entropy": tiger_entropy,
            "log_history": np.log1p(c["hist_len"].astype(np.float64)),
            "entropy_gap": tiger_entropy - c["sas_entropy"]}


def in_order(ranked: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user recall@10 and ndcg@10 of lists already in ranked order (padding -1)."""
    per_user = M.per_user_metrics(M.target_ranks(ranked, targets), (10,), (10,))
    return {"recall@10": per_user["recall@10"], "ndcg@10": per_user["ndcg@10"]}


def ordered(items: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Each row's candidates best `score` first (a tie keeps the row's order), padding (-1) last."""
    order = np.argsort(-np.where(items >= 0, score, -np.inf), 1, kind="stable")
    return np.where(np.take_along_axis(items >= 0, order, 1), np.take_along_axis(items, order, 1), -1)


def hits_and_gains(items: np.ndarray, score: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user recall@10 and ndcg@10 of the candidates ordered by `score` (padding last)."""
    return in_order(ordered(items, score), targets)


def best_on(fit: np.ndarray, c: dict, scores: dict) -> str:
    """The key of `scores` with the best fit-half recall@10, then ndcg@10 (then the first listed)."""
    table = {k: hits_and_gains(c["items"][fit], s[fit], c["targets"][fit]) for k, s in scores.items()}
    return max(scores, key=lambda k: (table[k]["recall@10"].mean(), table[k]["ndcg@10"].mean(), -list(scores).index(k)))


def stacker_features(c: dict, z: dict[str, np.ndarray]) -> np.ndarray:
    """(U, W, F) features of every candidate."""
    valid = c["items"] >= 0
    lp, sa = np.where(valid, c["logpi"], PAD), np.where(valid, c["sas"], PAD)  # (U, W)
    u, w = lp.shape
    pos = np.broadcast_to(np.log1p(np.arange(w, dtype=np.float64)), (u, w))
    # 0-based rank of each candidate among SASRec's top-W (W where it is outside): the count of
    # top-W log-probabilities above its own
    sas_rank = np.stack([np.searchsorted(-top, -row, side="left") for top, row in zip(c["sas_top"], sa)])
    cols = [lp, sa, pos, np.log1p(sas_rank.astype(np.float64))]
    cols += [f[:, None] * lp for f in z.values()] + [f[:, None] * sa for f in z.values()]
    return np.stack(cols, -1)


def fit_stacker(x: np.ndarray, valid: np.ndarray, is_target: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Linear weights (F,) maximising the mean log-softmax of the target among each user's
    candidates, over users whose target is a candidate; starts at log pi + log p_SASRec."""
    keep = is_target.any(1)
    xt = torch.as_tensor(x[keep], dtype=torch.float64)
    mask, tgt = torch.as_tensor(valid[keep]), torch.as_tensor(is_target[keep])
    w = torch.zeros(x.shape[-1], dtype=torch.float64)
    w[:2] = 1.0
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        s = (xt @ w).masked_fill(~mask, float("-inf"))  # (U', W)
        nll = -torch.where(tgt, torch.log_softmax(s, 1), torch.zeros_like(s)).sum(1)  # (U',): 0 * -inf is nan
        loss = nll.mean() + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def rerank(c: dict, fit: np.ndarray, weight: float) -> tuple[dict[str, np.ndarray], dict]:
    """Every re-ranker's scores (U, W) for all users, each chosen or fitted on the `fit` users."""
    lp, sa = c["logpi"], c["sas"]
    scores = {"tiger_cf": lp + weight * sa, "tiger": lp, "sasrec_order": sa}
    final = {w: lp + w * sa for w in FINAL_WEIGHTS}
    w_f = best_on(fit, c, final)
    scores["final"] = final[w_f]
    chosen: dict = {"final": {"weight": w_f}}
    z = {k: (f - f[fit].mean()) / max(f[fit].std(), 1e-12) for k, f in user_features(c).items()}
    for name, f in z.items():
        grid = {(w, b): lp + w * np.exp(b * f)[:, None] * sa for w in ADAPT_WEIGHTS for b in BETAS}
        key = best_on(fit, c, grid)
        scores[f"adaptive:{name}"] = grid[key]
        chosen[f"adaptive:{name}"] = {"weight": key[0], "beta": key[1]}
    x = stacker_features(c, z)
    is_target = c["items"] == c["targets"][:, None]
    coef = fit_stacker(x[fit], (c["items"] >= 0)[fit], is_target[fit])
    scores["stacker"] = x @ coef
    names = ["log_pi", "log_p_sasrec", "log1p_position", "log1p_sasrec_rank"]
    names += [f"{k}*log_pi" for k in z] + [f"{k}*log_p_sasrec" for k in z]
    chosen["stacker"] = dict(zip(names, coef.round(4).tolist()))
    return scores, chosen


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--users", type=int, default=6000, help="validation users (0: all)")
    ap.add_argument("--weight", type=float, default=None, help="tiger_cf's weight (default: the stage's, tasks/artifacts.py "
                    "tiger_cf_weight: evaluate.cf_weights' one value, or evaluate's validation choice)")
    ap.add_argument("--beam", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="seed of the fit/check split of the users")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tag", default="", help="suffix of the JSON's name")
    args = ap.parse_args(argv)
    params = load_params(overrides=args.set)
    weight = tiger_cf_weight(params.dataset_dir(), params.evaluate.cf_weights) if args.weight is None else args.weight
    report = stamp({"users": args.users, "weight": weight, "beam": args.beam, "seed": args.seed,
                    "overrides": args.set, "final_weights": FINAL_WEIGHTS, "adaptive_weights": ADAPT_WEIGHTS,
                    "betas": BETAS})
    report["commit"] = commit()
    report["params_hash"] = params.section_hash("data", "backbone", "sasrec", "evaluate")
    report["dataset"] = params.data.dataset

    c = candidates(params, args.users, weight, args.beam, args.batch)
    n = len(c["targets"])
    fit = np.random.default_rng(args.seed).permutation(n) < n // 2
    scores, chosen = rerank(c, fit, weight)
    check = ~fit
    per = {k: hits_and_gains(c["items"][check], s[check], c["targets"][check]) for k, s in scores.items()}
    fitted = {k: {m: float(v.mean()) for m, v in hits_and_gains(c["items"][fit], s[fit], c["targets"][fit]).items()}
              for k, s in scores.items()}
    in_beam = (c["items"] == c["targets"][:, None])[check]  # (U_check, W)
    report["users"] = {"all": n, "fit": int(fit.sum()), "check": int(check.sum())}
    report["chosen"] = chosen
    report["fit"] = fitted
    report["check"] = {k: {m: float(v.mean()) for m, v in p.items()} for k, p in per.items()}
    report["check_vs_tiger_cf"] = {k: {m: M.paired_bootstrap(per["tiger_cf"][m], p[m], args.bootstrap, 0)
                                       for m in ("recall@10", "ndcg@10")} for k, p in per.items() if k != "tiger_cf"}
    # tiger_cf's own recall@k on the check users; at k = the beam, the ceiling every re-ranker shares
    report["tiger_cf_recall"] = {f"recall@{k}": float(in_beam[:, :k].any(1).mean()) for k in (10, 20, 50, args.beam)}
    report["ceiling_recall@10"] = report["tiger_cf_recall"][f"recall@{args.beam}"]
    report["cost"] = {"decode_s": float(c["decode_s"]), "users_per_s": n / float(c["decode_s"])}
    for k in scores:
        d = report["check_vs_tiger_cf"].get(k, {}).get("recall@10")
        extra = f"  vs tiger_cf {d['diff']:+.4f} (p {d['p_value']:.2f})" if d else ""
        print(f"{k:28s} fit R@10 {fitted[k]['recall@10']:.4f}  check R@10 {report['check'][k]['recall@10']:.4f}{extra}")
    print("tiger_cf's recall@k (check):", report["tiger_cf_recall"])
    save(f"fusion_ceiling_{params.data.dataset}{args.tag}", report)
    return report


if __name__ == "__main__":
    main()
