"""Decoding cost of two-pass GRC against the backbone's beam search, in one run, same users.

    python -m benchmarks.grc_decode_cost --dataset instruments --beams 20 200 --users 1024 [--variant grc]
        [--model grpo --alpha-e 0.2]

Loads the trained backbone (`data/<ds>/backbone`) and the SFT model (`data/<ds>/sft/<variant>`)
or, with `--model grpo`, the GRC-RL policy (`data/<ds>/grpo`), decoded with EGRS at `--alpha-e`;
decodes the first `--users` test users at each beam with both, alternating which goes first,
`--repeats` times, and keeps the best wall time of each (the least disturbed by other jobs).
Both exclude history items as `data.exclude_history` says. Writes
`benchmarks/results/grc_decode_cost_<dataset>.json`.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import save, stamp
from grc_core.evaluation import rank_with_backbone, rank_with_grc
from grc_core.grc import DecodeConfig
from grc_core.trie import PrefixTrie
from tasks.artifacts import load_backbone, load_grc, load_item_table, load_split
from tasks.params import load_params


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="instruments")
    ap.add_argument("--beams", type=int, nargs="+", default=[20, 200])
    ap.add_argument("--users", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variant", default="grc")
    ap.add_argument("--model", choices=["sft", "grpo"], default="sft")
    ap.add_argument("--alpha-e", type=float, default=0.0, help="EGRS coefficient of the two-pass decode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--correct-fracs", type=float, nargs="+", default=[1.0],
                    help="correction budget as a share of the beam (evaluate.correct_width = frac x beam)")
    ap.add_argument("--rule", default="union")
    ap.add_argument("--reflect-frac", type=float, default=1.0, help="reflection budget as a share of the beam")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(None, [f"data.dataset={args.dataset}"])
    out_dir = params.dataset_dir()
    table, level_sizes, _ = load_item_table(out_dir, params.dataset.attributes)
    trie = PrefixTrie.from_ids(table.codes.numpy(), level_sizes)
    test = load_split(out_dir, "test", params.data.max_history)
    users = test.select(torch.arange(min(args.users, len(test))))
    backbone, grc = load_backbone(out_dir), load_grc(out_dir, "grc_rl" if args.model == "grpo" else f"{args.variant}_sft")
    excl = params.data.exclude_history
    rows = []
    for beam in args.beams:
        names = ["backbone"] + [f"grc@{f}" for f in args.correct_fracs]
        best = {n: float("inf") for n in names}
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                if name == "backbone":
                    rank_with_backbone(backbone, users, table, trie, beam, args.batch, exclude_history=excl)
                else:
                    frac = float(name.split("@")[1])
                    cfg = DecodeConfig(width=beam, correct_width=max(1, int(round(frac * beam))), rank_rule=args.rule,
                                       alpha_e=args.alpha_e, reflect_width=max(1, int(round(args.reflect_frac * beam))),
                                       verify_gamma=0.0, cf_weight=0.0)
                    rank_with_grc(grc, users, table, trie, cfg, args.batch, exclude_history=excl)
                best[name] = min(best[name], time.perf_counter() - t0)
        for name in names[1:]:
            rows.append({"beam": beam, "correct_width": max(1, int(round(float(name.split("@")[1]) * beam))),
                         "users": len(users), "backbone_s": round(best["backbone"], 2), "grc_s": round(best[name], 2),
                         "backbone_users_per_s": round(len(users) / best["backbone"], 1),
                         "grc_users_per_s": round(len(users) / best[name], 1),
                         "grc_over_backbone": round(best[name] / best["backbone"], 2)})
            print(rows[-1], flush=True)
    payload = {**stamp(vars(args)), "dataset": args.dataset, "variant": args.variant, "rows": rows}
    save(f"grc_decode_cost_{args.dataset}{args.tag}", payload)
    return payload


if __name__ == "__main__":
    main()
