"""Validation comparison of GRC ranking rules (joint, union, marginal) against the backbone's beam.

    python -m benchmarks.grc_rules --dataset instruments --beam 50 --users 2000

Same validation users (a fixed random subset) and beam for every row; history items excluded as
`data.exclude_history` says. Picks nothing by itself: the chosen rule goes into
`evaluate.rank_rule` by hand, with this JSON (`benchmarks/results/grc_rules_<dataset>.json`)
as the reason. Test users are never used here.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import save, stamp
from grc_core.evaluation import rank_with_backbone, rank_with_grc, ranking_metrics
from grc_core.grc import DecodeConfig
from grc_core.trie import PrefixTrie
from tasks.artifacts import load_backbone, load_grc, load_item_table, load_split, subset
from tasks.params import load_params


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="instruments")
    ap.add_argument("--beam", type=int, default=50)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--variants", nargs="+", default=["grc", "gc"])
    ap.add_argument("--rules", nargs="+", default=["joint", "union", "marginal"])
    ap.add_argument("--stage", default="sft", help="sft | grpo (grpo: the GRC-RL policy)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--reflect-frac", type=float, default=1.0, help="reflection budget as a share of the beam")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0])
    ap.add_argument("--correct-fracs", type=float, nargs="+", default=[1.0],
                    help="correction budget as a share of the beam")
    args = ap.parse_args(argv)
    params = load_params(None, [f"data.dataset={args.dataset}"])
    out_dir = params.dataset_dir()
    table, level_sizes, _ = load_item_table(out_dir, params.dataset.attributes)
    trie = PrefixTrie.from_ids(table.codes.numpy(), level_sizes)
    valid = subset(load_split(out_dir, "valid", params.data.max_history), args.users, params.backbone.train.seed)
    excl = params.data.exclude_history
    ks = tuple(k for k in (5, 10, 20, 50, 100, 200) if k <= args.beam)
    rows = []
    ranked, _ = rank_with_backbone(load_backbone(out_dir), valid, table, trie, args.beam, 128, exclude_history=excl)
    rows.append({"method": "tiger", **ranking_metrics(ranked, valid.target.numpy(), ks=ks)[0]})
    print(rows[-1], flush=True)
    for variant in args.variants:
        model = load_grc(out_dir, "grc_rl" if args.stage == "grpo" else f"{variant}_sft")
        for rule in args.rules:
            for alpha in args.alphas:
                for frac in args.correct_fracs:
                    cw = max(1, int(round(frac * args.beam)))
                    rw = max(1, int(round(args.reflect_frac * args.beam)))
                    cfg = DecodeConfig(width=args.beam, correct_width=cw, alpha_e=alpha, rank_rule=rule, reflect_width=rw,
                                       verify_gamma=0.0, cf_weight=0.0)
                    ranked, _ = rank_with_grc(model, valid, table, trie, cfg, 128, exclude_history=excl)
                    rows.append({"method": f"{variant}_{args.stage}", "rule": rule, "alpha_e": alpha,
                                 "correct_width": cw, **ranking_metrics(ranked, valid.target.numpy(), ks=ks)[0]})
                    print(rows[-1], flush=True)
    payload = {**stamp(vars(args)), "dataset": args.dataset, "split": "valid", "rows": rows}
    save(f"grc_rules_{args.dataset}_{args.stage}{args.tag}", payload)
    return payload


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
