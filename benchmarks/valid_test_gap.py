"""Validation against test Recall@10 of the trained backbone on the same users, at two beams, history kept or excluded.

    python -m benchmarks.valid_test_gap --dataset instruments --users 2000

Both splits are subset with the same seed, so the same users (one row per user in each split).
Writes `benchmarks/results/valid_test_gap_<dataset>.json`.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import save, stamp
from grc_core.evaluation import rank_with_backbone, ranking_metrics
from grc_core.trie import PrefixTrie
from tasks.artifacts import load_backbone, load_item_table, load_split, subset
from tasks.params import load_params


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="instruments")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    params = load_params(None, [f"data.dataset={args.dataset}"])
    out = params.dataset_dir()
    table, level_sizes, _ = load_item_table(out, params.dataset.attributes)
    trie = PrefixTrie.from_ids(table.codes.numpy(), level_sizes)
    model = load_backbone(out)
    rows = []
    for split in ("valid", "test"):
        inst = subset(load_split(out, split, params.data.max_history), args.users, args.seed)
        for beam, exclude in ((20, False), (20, True), (200, True)):
            ranked, _ = rank_with_backbone(model, inst, table, trie, beam, 256, exclude_history=exclude)
            summary, _ = ranking_metrics(ranked, inst.target.numpy(), ks=(5, 10))
            rows.append({"split": split, "beam": beam, "exclude_history": exclude, **summary})
            print(rows[-1], flush=True)
    return save(f"valid_test_gap_{args.dataset}", {**stamp(vars(args)), "rows": rows})


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
