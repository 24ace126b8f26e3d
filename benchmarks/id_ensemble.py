"""Does a second TIGER, trained on another kind of semantic ID, add what SASRec does not know?
A diagnostic on the validation split only (the test split is not read).

    python -m benchmarks.id_ensemble -S data.dataset=instruments --dirs A/data B/data \
        --cf-weights 1 2 [--users 6000] [--top 100] [--tag _prebuilt_cf]

`benchmarks/fusion_ceiling.py` found that no re-ranking of `tiger_cf`'s candidates by TIGER's
and SASRec's own scores beats `tiger_cf`. This asks the next question: with the scores of a
second generative model. `--dirs` are two runs of one dataset that share the splits, the items
and SASRec (`benchmarks/cf_ids.py` makes such runs, one per kind of ID) but have their own
tokenizer and backbone.
- Each run's `tiger_cf` beam is decoded at its `--cf-weights` weight.
- The candidates of a user are the union of the two beams' top `--top` items.
- Every candidate is scored by both backbones, teacher-forced on that run's IDs: log pi summed
  over the levels' log-softmax, as the beam search scores codes.
- The users are split into two seeded halves. The weights of
  a log pi_A + b log pi_B + w log p_SASRec are chosen on the first half ("fit") and read on the
  second ("check"), paired (bootstrap) against run A's `tiger_cf` as decoded, and against the
  same union scored without run B (b = 0: what the larger candidate set alone gives).
- `tiger_cf_a_plus_b` has one free weight: run A's own scoring, log pi_A + w_A log p_SASRec,
  plus b log pi_B, with b from the same grid (b = 0 is `tiger_cf`'s rule on the union).
Writes benchmarks/results/id_ensemble_<dataset><tag>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.cf_fusion import masked_log_probs
from benchmarks.common import commit, save, stamp
from benchmarks.fusion_ceiling import best_on, hits_and_gains, in_order
from grc_core import metrics as M
from grc_core.data import to_batch
from grc_core.evaluation import rank_with_backbone
from grc_core.grc import expand_memory
from tasks.artifacts import item_index, load_backbone, load_baseline, load_split, sasrec_log_probs, subset
from tasks.params import load_params

A_WEIGHTS = (0.5, 1.0)
B_WEIGHTS = (0.0, 0.25, 0.5, 1.0)
CF_WEIGHTS = (0.5, 1.0, 2.0, 4.0)


def union_candidates(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row the distinct items of a then b (first appearance order), padded with -1: (U, Wa + Wb)."""
    out = np.full((a.shape[0], a.shape[1] + b.shape[1]), -1, np.int64)
    for row, items in enumerate(np.concatenate([a, b], 1)):
        kept = list(dict.fromkeys(i for i in items.tolist() if i >= 0))
        out[row, :len(kept)] = kept
    return out


@torch.inference_mode()
def teacher_forced(backbone, inst, table, cand: np.ndarray, batch: int) -> np.ndarray:
    """log pi(item | user) of every candidate (U, C) under one backbone, the sum over levels of the
    log-softmax the beam search scores codes by (`BackboneStepper`); -inf on padding."""
    out = np.full(cand.shape, -np.inf)
    for start in range(0, len(inst), batch):
        rows = torch.arange(start, min(start + batch, len(inst)))
        part = inst.select(rows)
        c = torch.as_tensor(cand[rows.numpy()])  # (b, C)
        memory = expand_memory(backbone.encode(to_batch(part, table, with_target=False)), c.shape[1])
        codes = table.codes[c.clamp_min(0).reshape(-1)]  # (b*C, L)
        hidden = backbone.decode(backbone.embed_decoder_codes(codes[:, :-1]), memory)  # (b*C, L, D)
        lp = sum(F.log_softmax(logits, -1).gather(1, codes[:, j:j + 1])[:, 0]
                 for j, logits in enumerate(backbone.level_logits(hidden))).reshape(c.shape)  # (b, C)
        out[rows.numpy()] = torch.where(c >= 0, lp, torch.full_like(lp, float("-inf"))).numpy()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--dirs", type=Path, nargs=2, required=True, help="the two runs' data folders (A first)")
    ap.add_argument("--cf-weights", type=float, nargs=2, required=True, help="each run's tiger_cf weight")
    ap.add_argument("--users", type=int, default=6000, help="validation users (0: all)")
    ap.add_argument("--beam", type=int, default=200)
    ap.add_argument("--top", type=int, default=100, help="items taken from each beam into the union")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="seed of the fit/check split of the users")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tag", default="", help="suffix of the JSON's name")
    ap.add_argument("--cache", type=Path, default=None,
                    help="an .npz of the decoded beams and candidate scores: written if absent, read if present")
    args = ap.parse_args(argv)
    params = load_params(overrides=args.set)
    dataset = params.data.dataset
    report = stamp({"dirs": [str(d) for d in args.dirs], "cf_weights": args.cf_weights, "users": args.users,
                    "beam": args.beam, "top": args.top, "seed": args.seed, "overrides": args.set,
                    "grid": {"a": A_WEIGHTS, "b": B_WEIGHTS, "w": CF_WEIGHTS}})
    report["commit"] = commit()
    report["dataset"] = dataset
    runs = [d.resolve() / dataset for d in args.dirs]
    inst = subset(load_split(runs[0], "valid", params.data.max_history), args.users, params.evaluate.users_seed)
    item_logp = sasrec_log_probs(load_baseline(runs[0]))
    excl = params.data.exclude_history
    if args.cache is not None and args.cache.exists():  # the decodes and scores of an earlier run
        with np.load(args.cache) as z:
            beams, cand, lp_a, lp_b, sas = [z["beam_a"], z["beam_b"]], z["cand"], z["lp_a"], z["lp_b"], z["sas"]
            decode_s, score_s = float(z["decode_s"]), float(z["score_s"])
        if len(cand) != len(inst):
            raise ValueError(f"{args.cache}: {len(cand)} users cached, {len(inst)} asked for (--users)")
    else:
        beams, models, t0 = [], [], time.perf_counter()
        for run, w in zip(runs, args.cf_weights):
            table, trie, _, _ = item_index(run, params.dataset.attributes, "cpu")
            backbone = load_backbone(run)
            items, _ = rank_with_backbone(backbone, inst, table, trie, args.beam, 64, exclude_history=excl,
                                          item_logp=item_logp, cf_weight=w)
            beams.append(items)
            models.append((backbone, table))
        decode_s = time.perf_counter() - t0
        cand = union_candidates(beams[0][:, :args.top], beams[1][:, :args.top])  # (U, C)
        t0 = time.perf_counter()
        lp_a, lp_b = (teacher_forced(m, inst, tb, cand, args.batch) for m, tb in models)
        score_s = time.perf_counter() - t0
        logp = masked_log_probs(item_logp, inst, 64, excl)  # (U, N)
        sas = np.take_along_axis(logp.numpy(), np.where(cand >= 0, cand, 0), 1)  # (U, C)
        if args.cache is not None:
            np.savez(args.cache, beam_a=beams[0], beam_b=beams[1], cand=cand, lp_a=lp_a, lp_b=lp_b, sas=sas,
                     decode_s=decode_s, score_s=score_s)

    pad = cand < 0  # never ranked (hits_and_gains masks it); zeros keep 0 * -inf out of the sums
    lp_a[pad] = lp_b[pad] = sas[pad] = 0.0
    n = len(inst)
    fit = np.random.default_rng(args.seed).permutation(n) < n // 2
    c = {"items": cand, "targets": inst.target.numpy()}
    grid = {(a, b, w): a * lp_a + b * lp_b + w * sas for a in A_WEIGHTS for b in B_WEIGHTS for w in CF_WEIGHTS}
    both = best_on(fit, c, grid)
    alone = best_on(fit, c, {k: v for k, v in grid.items() if k[1] == 0})
    # one free weight: run A's tiger_cf scoring (log pi_A + w_A log p_SASRec) plus b log pi_B
    fixed = {b: lp_a + b * lp_b + args.cf_weights[0] * sas for b in B_WEIGHTS}
    b_fixed = best_on(fit, c, fixed)
    check = ~fit
    per = {"tiger_cf_a": in_order(beams[0][check], c["targets"][check]),  # each run's tiger_cf as decoded
           "tiger_cf_b": in_order(beams[1][check], c["targets"][check]),
           "union_a_sasrec": hits_and_gains(cand[check], grid[alone][check], c["targets"][check]),
           "union_a_b_sasrec": hits_and_gains(cand[check], grid[both][check], c["targets"][check]),
           "tiger_cf_a_plus_b": hits_and_gains(cand[check], fixed[b_fixed][check], c["targets"][check])}
    report["users"] = {"all": n, "fit": int(fit.sum()), "check": int(check.sum())}
    report["chosen"] = {"union_a_sasrec": dict(zip("abw", alone)), "union_a_b_sasrec": dict(zip("abw", both)),
                        "tiger_cf_a_plus_b": {"a": 1.0, "b": b_fixed, "w": args.cf_weights[0]}}
    report["check"] = {k: {m: float(v.mean()) for m, v in p.items()} for k, p in per.items()}
    report["check_paired"] = {f"{k}_vs_{base}": {m: M.paired_bootstrap(per[base][m], per[k][m], args.bootstrap, 0)
                                                for m in ("recall@10", "ndcg@10")}
                              for k, base in (("tiger_cf_a_plus_b", "tiger_cf_a"),
                                              ("union_a_b_sasrec", "tiger_cf_a"), ("union_a_b_sasrec", "union_a_sasrec"),
                                              ("union_a_sasrec", "tiger_cf_a"), ("tiger_cf_b", "tiger_cf_a"))}
    report["candidates"] = {"mean": float((cand >= 0).sum(1).mean()),
                            "target_among": float((cand == c["targets"][:, None]).any(1)[check].mean())}
    report["cost"] = {"decode_s": decode_s, "teacher_forced_s": score_s}
    for k, v in report["check"].items():
        print(f"{k:20s} check R@10 {v['recall@10']:.4f}  N@10 {v['ndcg@10']:.4f}")
    for k, v in report["check_paired"].items():
        r = v["recall@10"]
        print(f"{k:40s} {r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] p {r['p_value']:.3f}")
    print("chosen", report["chosen"], "candidates", report["candidates"])
    save(f"id_ensemble_{dataset}{args.tag}", report)
    return report


if __name__ == "__main__":
    main()
