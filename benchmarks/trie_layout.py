"""Dense against csr levels of `PrefixTrie` at catalog scale: bytes, build time, decoding speed.

    python -m benchmarks.trie_layout [--items 1000000] [--users 512] [--beams 20 200] [--threads 2]

Catalog: `--items` items with IDs drawn uniformly from 4 levels of 256 codes (then TIGER's
disambiguation level where two items draw the same 4 codes): the worst case for the dense layout,
since almost every item is its own level-3 node. Decoding: the backbone of params.yaml's
`backbone.model` with random weights from `--seed` (speed does not depend on the weights),
`rank_with_backbone` over `--users` users with random 20-item histories, history excluded as the
candidate dump runs it, batch `backbone.eval_batch_size`. Three tries over the same IDs: every
level dense, every level csr, and the default size rule; the ranked items and scores must agree
exactly, which the run checks. Peak memory of the tries is their tensor bytes (`nbytes`).
JSON: `benchmarks/results/trie_layout.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from grc_core.data import Instances, ItemTable
from grc_core.evaluation import rank_with_backbone
from grc_core.model import Seq2Seq
from grc_core.semantic_ids import disambiguate
from grc_core.trie import PrefixTrie
from tasks.params import load_params

RESULTS = Path(__file__).resolve().parent / "results" / "trie_layout.json"
HISTORY = 20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=512)
    p.add_argument("--beams", type=int, nargs="+", default=[20, 200])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    ids, extra = disambiguate(rng.integers(0, 256, size=(args.items, 4)))  # (N, 4 or 5)
    sizes = [256] * 4 + ([extra] if extra else [])
    params = load_params()
    torch.manual_seed(args.seed)
    model = Seq2Seq(params.backbone.model, sizes, attr_sizes=[]).eval()
    table = ItemTable(torch.from_numpy(ids), torch.zeros(len(ids), 0, dtype=torch.long))
    history = torch.from_numpy(np.stack([rng.choice(args.items, HISTORY, replace=False) for _ in range(args.users)]))
    inst = Instances(torch.arange(args.users), history, torch.zeros(args.users, dtype=torch.long))
    report: dict = dict(
        command="python -m benchmarks.trie_layout " + " ".join(sys.argv[1:] if argv is None else argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__,
                     load_average_at_start=[round(x, 2) for x in os.getloadavg()]),
        settings=dict(vars(args), out=str(args.out), level_sizes=sizes, model=str(params.backbone.model),
                      batch=params.backbone.eval_batch_size),
        tries={},
    )
    ranked: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for name, limit in (("dense", 2**62), ("csr", 0), ("default", None)):
        t0 = time.perf_counter()
        trie = PrefixTrie.from_ids(ids, sizes) if limit is None else PrefixTrie.from_ids(ids, sizes, dense_max_bytes=limit)
        rec = dict(build_s=round(time.perf_counter() - t0, 2), layouts=list(trie.layouts),
                   nbytes_mib=round(trie.nbytes / 2**20, 1),
                   level_mib=[round(trie.level_nbytes(level) / 2**20, 1) for level in range(trie.num_levels)],
                   nodes=[trie.num_nodes(level) for level in range(trie.num_levels + 1)], decode={})
        ranked[name] = {}
        for beam in args.beams:
            batch = params.backbone.eval_batch_size if beam <= 64 else 32
            rank_with_backbone(model, inst.select(torch.arange(min(batch, args.users))), table, trie, beam, batch,
                               exclude_history=True)  # warm-up, untimed
            t0 = time.perf_counter()
            items, scores = rank_with_backbone(model, inst, table, trie, beam, batch, exclude_history=True)
            seconds = time.perf_counter() - t0
            ranked[name][beam] = (items, scores)
            rec["decode"][str(beam)] = dict(batch=batch, seconds=round(seconds, 2), users_per_s=round(args.users / seconds, 1))
        report["tries"][name] = rec
        print(name, json.dumps(rec), flush=True)
        del trie
    report["identical_rankings"] = all(
        np.array_equal(ranked[a][beam][0], ranked["dense"][beam][0]) and np.array_equal(ranked[a][beam][1], ranked["dense"][beam][1])
        for a in ("csr", "default") for beam in args.beams)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"identical rankings: {report['identical_rankings']}; wrote {args.out}")


if __name__ == "__main__":
    main()
