"""GRC's drafts from the beam or from VED (`evaluate.grc_drafts`; the V-STAR issue's "GRC drafts may
also be drawn by VED"), on the same users and models.

    python -m benchmarks.grc_drafts [-S data.data_dir=...] [--methods grc_sft grc_rl] [--tag _x]

For each GRC method (a trained template model under data/<dataset>/), with the `evaluate` section's
rules (rank rule, EGRS, reflection budget, SASRec's value in both passes at `evaluate.grc_cf_weight`):
1. validation (`--valid-users`, a fixed subset seeded by `evaluate.users_seed`; 0: all): two-pass
   decoding with the beam's drafts and with VED's (`vstar.ved_test`, SASRec's V_cf as its value,
   `evaluate.beam` candidates); the draft source with the better Recall@10 (then NDCG@10; ties go
   to the beam) is the validation choice;
2. test (`--test-users`, the subset `evaluate.users` with that count would rank): both sources once,
   paired bootstrap of VED against the beam, and of each against SASRec and TIGER (their test ranks
   from the same run's eval/ where they cover these users); 95% intervals; users/s of each decode.
Writes benchmarks/results/grc_drafts_<dataset><tag>.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from benchmarks.common import commit, save, stamp
from benchmarks.verifier import against_references, per_user, summary
from grc_core import metrics as M
from grc_core.evaluation import rank_with_grc
from tasks.artifacts import decode_config, item_index, load_baseline, load_grc, load_split, sasrec_log_probs, subset
from tasks.params import load_params

SOURCES = ("beam", "ved")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--methods", nargs="+", default=["grc_sft"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--valid-users", type=int, default=0)
    ap.add_argument("--test-users", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    params = load_params(overrides=args.set)
    out_dir, ev = params.dataset_dir(), params.evaluate
    excl = params.data.exclude_history
    report = stamp({"overrides": args.set, "methods": args.methods, "valid_users": args.valid_users,
                    "test_users": args.test_users, "rank_rule": ev.rank_rule, "grc_cf_weight": ev.grc_cf_weight,
                    "ved": vars(params.vstar.ved_test)})
    report["commit"] = commit()
    report["params_hash"] = params.section_hash("data", "mine", "sft", "grpo", "evaluate", "vstar")
    report["dataset"] = params.data.dataset
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    splits = {"valid": subset(load_split(out_dir, "valid", params.data.max_history), args.valid_users, ev.users_seed),
              "test": subset(load_split(out_dir, "test", params.data.max_history), args.test_users, ev.users_seed)}
    item_logp = sasrec_log_probs(load_baseline(out_dir))
    beam = decode_config(replace(ev, grc_drafts="beam"), ev.beam, params.vstar.ved_test)
    configs = {"beam": beam, "ved": replace(beam, draft_ved=params.vstar.ved_test)}
    results = {}
    for method in args.methods:
        model = load_grc(out_dir, method)
        r: dict = {}
        for split, inst in splits.items():
            target = inst.target.numpy()
            pus, rate = {}, {}
            for source, cfg in configs.items():
                t0 = time.perf_counter()
                ranked, _ = rank_with_grc(model, inst, table, trie, cfg, args.batch, exclude_history=excl,
                                          item_logp=item_logp)
                rate[source] = len(inst) / (time.perf_counter() - t0)
                pus[source] = per_user(ranked, target)
            r[split] = {"users": len(inst), "metrics": {s: summary(v) for s, v in pus.items()}, "users_per_s": rate,
                        "ci95": {s: {m: M.bootstrap_interval(v[m], args.bootstrap, 0) for m in ("recall@10", "ndcg@10")}
                                 for s, v in pus.items()},
                        "ved_vs_beam": {m: M.paired_bootstrap(pus["beam"][m], pus["ved"][m], args.bootstrap, 0)
                                        for m in ("recall@10", "ndcg@10")}}
            if split == "valid":
                m = r[split]["metrics"]
                r["chosen"] = max(SOURCES, key=lambda s: (m[s]["recall@10"], m[s]["ndcg@10"], s == "beam"))
            else:
                r[split].update(against_references(out_dir, inst.user.numpy(), pus, args.bootstrap,
                                                   ("sasrec", "tiger")))
            print(method, split, {s: round(v["recall@10"], 4) for s, v in r[split]["metrics"].items()},
                  "ved - beam R@10", round(r[split]["ved_vs_beam"]["recall@10"]["diff"], 4),
                  "p", round(r[split]["ved_vs_beam"]["recall@10"]["p_value"], 3), flush=True)
        results[method] = r
    report["methods"] = results
    save(f"grc_drafts_{params.data.dataset}{args.tag}", report)
    return report


if __name__ == "__main__":
    main()
