"""Decoding cost of two-pass GRC against the backbone's beam search, in one run, same users.

    python -m benchmarks.grc_decode_cost --dataset instruments --beams 20 200 --users 1024 [--variant grc]

Loads the trained backbone (`data/<ds>/backbone`) and the SFT model (`data/<ds>/sft/<variant>`),
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
from tasks.backbone import load_backbone, load_item_table, load_split
from tasks.params import load_params
from tasks.sft import load_grc


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="instruments")
    ap.add_argument("--beams", type=int, nargs="+", default=[20, 200])
    ap.add_argument("--users", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variant", default="grc")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(None, [f"data.dataset={args.dataset}"])
    out_dir = params.dataset_dir()
    table, level_sizes, _ = load_item_table(out_dir, params.dataset.attributes)
    trie = PrefixTrie.from_ids(table.codes.numpy(), level_sizes)
    test = load_split(out_dir, "test", params.data.max_history)
    users = test.select(torch.arange(min(args.users, len(test))))
    backbone, grc = load_backbone(out_dir), load_grc(out_dir, args.variant)
    excl = params.data.exclude_history
    rows = []
    for beam in args.beams:
        best = {"backbone": float("inf"), "grc": float("inf")}
        for r in range(args.repeats):
            order = ["backbone", "grc"] if r % 2 == 0 else ["grc", "backbone"]
            for name in order:
                t0 = time.perf_counter()
                if name == "backbone":
                    rank_with_backbone(backbone, users, table, trie, beam, args.batch, exclude_history=excl)
                else:
                    rank_with_grc(grc, users, table, trie, DecodeConfig(width=beam), args.batch, exclude_history=excl)
                best[name] = min(best[name], time.perf_counter() - t0)
        rows.append({"beam": beam, "users": len(users), "backbone_s": round(best["backbone"], 2),
                     "grc_s": round(best["grc"], 2), "backbone_users_per_s": round(len(users) / best["backbone"], 1),
                     "grc_users_per_s": round(len(users) / best["grc"], 1),
                     "grc_over_backbone": round(best["grc"] / best["backbone"], 2)})
        print(rows[-1], flush=True)
    payload = {**stamp(vars(args)), "dataset": args.dataset, "variant": args.variant, "rows": rows}
    save(f"grc_decode_cost_{args.dataset}", payload)
    return payload


if __name__ == "__main__":
    main()
