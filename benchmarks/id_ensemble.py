"""Does a second TIGER, trained on another kind of semantic ID, add what SASRec does not know?
A diagnostic on the validation split only (the test split is not read).

    python -m benchmarks.id_ensemble -S data.dataset=instruments --dirs A/data B/data \
        --cf-weights 1 2 [--users 6000] [--top 100] [--tag _prebuilt_cf]
    python -m benchmarks.id_ensemble --dirs A1/data B1/data A2/data B2/data --cf-weights 4 2 4 4 \
        --users 0 --tag _cf_text_s2028-2029        # one pair per seed, then averaged per user

`benchmarks/fusion_ceiling.py` found that no re-ranking of `tiger_cf`'s candidates by TIGER's
and SASRec's own scores beats `tiger_cf`. This asks the next question: with the scores of a
second generative model. `--dirs` are two runs of one dataset that share the splits, the items
and SASRec (`benchmarks/cf_ids.py` or `benchmarks/variant_runs.py` make such runs, one per kind of
ID) but have their own tokenizer and backbone.
- Each run's `tiger_cf` beam is decoded at its `--cf-weights` weight, steered by run A's
  collaborative distribution: its SASRec, or SASRec fused with the sasrec stage's ensemble where
  the run has one (`tasks.artifacts.cf_log_probs`, what the pipeline's `tiger_cf` uses). The JSON
  says which (`collaborative`).
- The candidates of a user are the union of the two beams' top `--top` items.
- Every candidate is scored by both backbones, teacher-forced on that run's IDs: log pi summed
  over the levels' log-softmax, as the beam search scores codes.
- The users are split into two seeded halves. The weights of
  a log pi_A + b log pi_B + w log p_SASRec are chosen on the first half ("fit") and read on the
  second ("check"), paired (bootstrap) against run A's `tiger_cf` as decoded, and against the
  same union scored without run B (b = 0: what the larger candidate set alone gives).
- `tiger_cf_a_plus_b` has one free weight: run A's own scoring, log pi_A + w_A log p_SASRec,
  plus b log pi_B, with b from the same grid (b = 0 is `tiger_cf`'s rule on the union).
- With several pairs (seeds of one dataset, so the same validation users and the same halves),
  each pair chooses its own weights on the fit half, and each method's check-half metric is
  averaged per user over the pairs before the same paired tests (`seed_averaged`).
Writes benchmarks/results/id_ensemble_<dataset><tag>.json.

`--test` is the one test read that a screen may earn: per pair, b of `tiger_cf_a_plus_b` is chosen
on every validation user the evaluate stage ranked (tiger_cf's rule, `grc_core.metrics.choose_weight`),
then the test users are decoded once. The ranks go to run A's `data/<dataset>/eval_ide/` (and
`eval_ide/valid/`) as `tiger_cf_ide`, beside copies of the stage's rank files, for
`benchmarks.seeds_table --eval-subdir eval_ide`; the JSON (`..._test.json`) records each b. Run A's
`tiger_cf` beam, decoded here, must rank every user as the stage did, or the read stops.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.cf_fusion import masked_log_probs
from benchmarks.common import check_stage_ranks, commit, copy_stage_ranks, save, stage_users, stamp
from benchmarks.fusion_ceiling import best_on, hits_and_gains, in_order, ordered
from grc_core import metrics as M
from grc_core.data import to_batch
from grc_core.evaluation import rank_with_backbone
from grc_core.grc import expand_memory
from tasks.artifacts import cf_log_probs, item_index, load_backbone, load_ensemble, load_split, subset
from tasks.evaluate import save_ranks
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


COMPARISONS = (("tiger_cf_a_plus_b", "tiger_cf_a"), ("union_a_b_sasrec", "tiger_cf_a"),
               ("union_a_b_sasrec", "union_a_sasrec"), ("union_a_sasrec", "tiger_cf_a"), ("tiger_cf_b", "tiger_cf_a"))


def cache_path(cache: Path | None, pair: int, pairs: int) -> Path | None:
    """The pair's cache file: `cache` itself for one pair, `<stem>_<pair><suffix>` for several."""
    if cache is None or pairs == 1:
        return cache
    return cache.with_name(f"{cache.stem}_{pair}{cache.suffix}")


def decode_and_score(runs: list[Path], cf_weights: list[float], inst, params, args, cache: Path | None) -> dict:
    """Both runs' `tiger_cf` beams, their union's top `--top` items, and every candidate's log pi
    under each backbone and log p of run A's collaborative distribution (SASRec, or its ensemble where
    the run's sasrec stage trained one: what the run's `tiger_cf` is steered by)."""
    if cache is not None and cache.exists():  # the decodes and scores of an earlier run
        with np.load(cache) as z:
            got = {k: z[k] for k in ("beam_a", "beam_b", "cand", "lp_a", "lp_b", "sas")}
            got.update(decode_s=float(z["decode_s"]), score_s=float(z["score_s"]))
        if len(got["cand"]) != len(inst):
            raise ValueError(f"{cache}: {len(got['cand'])} users cached, {len(inst)} asked for (--users)")
        return got
    item_logp = cf_log_probs(runs[0])
    excl = params.data.exclude_history
    beams, models, t0 = [], [], time.perf_counter()
    for run, w in zip(runs, cf_weights):
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
    got = {"beam_a": beams[0], "beam_b": beams[1], "cand": cand, "lp_a": lp_a, "lp_b": lp_b, "sas": sas,
           "decode_s": decode_s, "score_s": score_s}
    if cache is not None:
        np.savez(cache, **got)
    return got


def one_pair(got: dict, targets: np.ndarray, fit: np.ndarray, cf_weight_a: float) -> tuple[dict, dict]:
    """The weights chosen on the fit half, and each method's per-user metrics on the check half."""
    cand, lp_a, lp_b, sas = got["cand"], got["lp_a"].copy(), got["lp_b"].copy(), got["sas"].copy()
    pad = cand < 0  # never ranked (hits_and_gains masks it); zeros keep 0 * -inf out of the sums
    lp_a[pad] = lp_b[pad] = sas[pad] = 0.0
    c = {"items": cand, "targets": targets}
    grid = {(a, b, w): a * lp_a + b * lp_b + w * sas for a in A_WEIGHTS for b in B_WEIGHTS for w in CF_WEIGHTS}
    both = best_on(fit, c, grid)
    alone = best_on(fit, c, {k: v for k, v in grid.items() if k[1] == 0})
    # one free weight: run A's tiger_cf scoring (log pi_A + w_A log p_SASRec) plus b log pi_B
    fixed = {b: lp_a + b * lp_b + cf_weight_a * sas for b in B_WEIGHTS}
    b_fixed = best_on(fit, c, fixed)
    check = ~fit
    per = {"tiger_cf_a": in_order(got["beam_a"][check], targets[check]),  # each run's tiger_cf as decoded
           "tiger_cf_b": in_order(got["beam_b"][check], targets[check]),
           "union_a_sasrec": hits_and_gains(cand[check], grid[alone][check], targets[check]),
           "union_a_b_sasrec": hits_and_gains(cand[check], grid[both][check], targets[check]),
           "tiger_cf_a_plus_b": hits_and_gains(cand[check], fixed[b_fixed][check], targets[check])}
    chosen = {"union_a_sasrec": dict(zip("abw", alone)), "union_a_b_sasrec": dict(zip("abw", both)),
              "tiger_cf_a_plus_b": {"a": 1.0, "b": b_fixed, "w": cf_weight_a}}
    candidates = {"mean": float((cand >= 0).sum(1).mean()),
                  "target_among": float((cand == targets[:, None]).any(1)[check].mean())}
    return {"chosen": chosen, "candidates": candidates}, per


def summarise(per: dict, n_boot: int) -> dict:
    """Each method's check-half means and the paired tests of COMPARISONS."""
    return {"check": {k: {m: float(v.mean()) for m, v in p.items()} for k, p in per.items()},
            "check_paired": {f"{k}_vs_{base}": {m: M.paired_bootstrap(per[base][m], per[k][m], n_boot, 0)
                                               for m in ("recall@10", "ndcg@10")} for k, base in COMPARISONS}}


def show(part: dict) -> None:
    for k, v in part["check"].items():
        print(f"{k:20s} check R@10 {v['recall@10']:.4f}  N@10 {v['ndcg@10']:.4f}")
    for k, v in part["check_paired"].items():
        r = v["recall@10"]
        print(f"{k:40s} {r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] p {r['p_value']:.3f}")


TEST_DIR = "eval_ide"  # run A's folder of the test read's rank files (benchmarks.seeds_table --eval-subdir)
COPIED = ("sasrec", "sasrec_ens", "tiger", "tiger_cf")  # the evaluate stage's ranks set beside them


def plus_b_score(got: dict, b: float, cf_weight_a: float) -> np.ndarray:
    """`tiger_cf_a_plus_b`'s score of every candidate: log pi_A + w_A log p_collab + b log pi_B."""
    return got["lp_a"] + cf_weight_a * got["sas"] + b * np.where(got["cand"] >= 0, got["lp_b"], 0.0)


def test_read(runs: list[Path], weights: list[float], params, args, cache: Path | None) -> dict:
    """The one-weight scoring read once on test: b chosen on every validation user of the evaluate
    stage (tiger_cf's rule, `M.choose_weight`), then the test users decoded and ranked by it. The
    ranks go to run A's `eval_ide/` (and `eval_ide/valid/`) as `tiger_cf_ide`, beside copies of the
    stage's own rank files; run A's `tiger_cf` beam must rank as the stage's did."""
    out_dir = runs[0]
    row: dict = {"runs": [str(r) for r in runs], "cf_weights": weights}
    for split in ("valid", "test"):
        inst = stage_users(out_dir, split, params.data.max_history, "tiger_cf")
        got = decode_and_score(runs, weights, inst, params, args,
                               None if cache is None else cache.with_name(f"{cache.stem}_{split}{cache.suffix}"))
        users, targets = inst.user.numpy(), inst.target.numpy()
        check_stage_ranks(out_dir, split, "tiger_cf", users, M.target_ranks(got["beam_a"], targets),
                          "run A's beam is not the stage's tiger_cf, which tiger_cf_ide is compared with")
        if split == "valid":
            choice = M.choose_weight({b: M.target_ranks(ordered(got["cand"], plus_b_score(got, b, weights[0])), targets)
                                      for b in B_WEIGHTS})
            row["b"], row["valid"] = choice["chosen"], choice["valid"]
        ranks = M.target_ranks(ordered(got["cand"], plus_b_score(got, row["b"], weights[0])), targets)
        save_ranks(out_dir, "tiger_cf_ide", users, ranks, split, root=TEST_DIR)
        copy_stage_ranks(out_dir, split, TEST_DIR, COPIED)
        row[f"{split}_users"] = int(len(users))
    print(f"{out_dir}: b {row['b']} chosen on {row['valid_users']} validation users: "
          + ", ".join(f"{r['weight']}: {r['recall@10']:.4f}" for r in row["valid"]), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--dirs", type=Path, nargs="+", required=True,
                    help="data folders in pairs, A then B, one pair per seed")
    ap.add_argument("--cf-weights", type=float, nargs="+", required=True,
                    help="each run's tiger_cf weight, in the order of --dirs")
    ap.add_argument("--users", type=int, default=6000, help="validation users (0: all)")
    ap.add_argument("--beam", type=int, default=200)
    ap.add_argument("--top", type=int, default=100, help="items taken from each beam into the union")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="seed of the fit/check split of the users")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tag", default="", help="suffix of the JSON's name")
    ap.add_argument("--cache", type=Path, default=None,
                    help="an .npz of the decoded beams and candidate scores: written if absent, read if present "
                         "(with several pairs, one file per pair: <stem>_<i>.npz)")
    ap.add_argument("--test", action="store_true",
                    help="the test read instead of the screen: b chosen on every validation user, then the test "
                         "users ranked once; rank files under each run A's data/<dataset>/eval_ide/")
    args = ap.parse_args(argv)
    if len(args.dirs) % 2 or len(args.cf_weights) != len(args.dirs):
        raise SystemExit(f"--dirs must come in pairs (A B per seed) with one --cf-weights each; got "
                         f"{len(args.dirs)} folders and {len(args.cf_weights)} weights")
    params = load_params(overrides=args.set)
    dataset = params.data.dataset
    n_pairs = len(args.dirs) // 2
    report = stamp({"dirs": [str(d) for d in args.dirs], "cf_weights": args.cf_weights, "users": args.users,
                    "beam": args.beam, "top": args.top, "seed": args.seed, "overrides": args.set,
                    "grid": {"a": A_WEIGHTS, "b": B_WEIGHTS, "w": CF_WEIGHTS}})
    report["commit"] = commit()
    report["dataset"] = dataset
    if args.test:
        report["test_read"] = [test_read([d.resolve() / dataset for d in args.dirs[2 * i:2 * i + 2]],
                                         args.cf_weights[2 * i:2 * i + 2], params, args,
                                         cache_path(args.cache, i, n_pairs)) for i in range(n_pairs)]
        save(f"id_ensemble_{dataset}{args.tag}_test", report)
        return report
    pairs, check_users = [], None
    for i in range(n_pairs):
        runs = [d.resolve() / dataset for d in args.dirs[2 * i:2 * i + 2]]
        weights = args.cf_weights[2 * i:2 * i + 2]
        inst = subset(load_split(runs[0], "valid", params.data.max_history), args.users, params.evaluate.users_seed)
        members, ens_weight = load_ensemble(runs[0])
        got = decode_and_score(runs, weights, inst, params, args, cache_path(args.cache, i, n_pairs))
        n = len(inst)
        fit = np.random.default_rng(args.seed).permutation(n) < n // 2
        users = inst.user.numpy()[~fit]
        if check_users is not None and not np.array_equal(users, check_users):
            raise ValueError(f"pair {i} ({runs[0]}): its check half holds other users than pair 0's; the pairs "
                             "must be seeds of one dataset's splits for a seed average")
        check_users = users
        part, per = one_pair(got, inst.target.numpy(), fit, weights[0])
        part.update(summarise(per, args.bootstrap))
        part["users"] = {"all": n, "fit": int(fit.sum()), "check": int((~fit).sum())}
        part["collaborative"] = {"sasrec_ensemble_members": len(members), "sasrec_ensemble_weight": ens_weight}
        part["cost"] = {"decode_s": got["decode_s"], "teacher_forced_s": got["score_s"]}
        print(f"\n## pair {i}: {runs[0]} + {runs[1]}")
        show(part)
        print("chosen", part["chosen"], "candidates", part["candidates"])
        pairs.append((part, per))
    if n_pairs == 1:  # the record's layout of a single pair, as before
        report.update(pairs[0][0])
    else:
        report["pairs"] = [p for p, _ in pairs]
        averaged = {k: {m: np.mean([per[k][m] for _, per in pairs], 0) for m in pairs[0][1][k]}
                    for k in pairs[0][1]}  # per check user, averaged over the seeds
        report["seed_averaged"] = summarise(averaged, args.bootstrap)
        print(f"\n## seed-averaged over {n_pairs} pairs, {len(check_users)} check users")
        show(report["seed_averaged"])
    save(f"id_ensemble_{dataset}{args.tag}", report)
    return report


if __name__ == "__main__":
    main()
