"""VED's priority at test (issue 18; the paper's value-only against entropy-only ablation): the
`vstar` policy decoded by VED under `vstar.ved_test` with G = V + lambda H (`reference`), G = V
(`value_only`: entropy_weight 0) and G = lambda H (`entropy_only`: value_weight 0; V then only
orders the leaves VED returns), the value source fixed (`--source`, benchmarks/vstar.py's
validation choice), beside the policy's beam of `--beam`, all on the same fixed validation and
test users (`evaluate.users_seed`). Paired bootstrap tests on test of each priority against the
reference and against the beam. Nothing is chosen here: the rows are ablations of the committed
priority, reported on both splits.

    python -m benchmarks.ved_priority -S data.data_dir=... [--source sum:1] [--users 3000] [--tag _x]

Writes benchmarks/results/ved_priority_<dataset><tag>.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import commit, save, stamp
from benchmarks.vstar import metrics_of, parse_source
from grc_core import metrics as M
from grc_core.config import VEDConfig
from grc_core.evaluation import rank_with_backbone
from grc_core.ved import rank_with_ved
from tasks.artifacts import item_index, load_backbone, load_split, load_value_head, model_dir, subset, ved_value
from tasks.params import load_params

PRIORITIES = {"reference": {}, "value_only": {"entropy_weight": 0.0}, "entropy_only": {"value_weight": 0.0}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", action="append", default=[], dest="overrides")
    ap.add_argument("--source", default="sum:1", help="VED's value: learned | cf | sum:w")
    ap.add_argument("--beam", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--users", type=int, default=0, help="validation and test users (0: all), a fixed subset")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    params = load_params(None, args.overrides)
    torch.set_num_threads(params.vstar.threads or torch.get_num_threads())
    out_dir, excl = params.dataset_dir(), params.data.exclude_history
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    policy = load_backbone(out_dir, "cpu", model_dir(out_dir, "vstar") / "model.safetensors")
    head, meta = load_value_head(out_dir)
    value_for = ved_value(head, out_dir, trie, *parse_source(args.source))
    out: dict = {"dataset": params.data.dataset, "params_hash": params.section_hash(), "commit": commit(),
                 "ved_test": meta["ved_test"], "priorities": PRIORITIES}
    per_user: dict = {"valid": {}, "test": {}}
    for split in per_user:
        inst = subset(load_split(out_dir, split, params.data.max_history), args.users, params.evaluate.users_seed)
        targets, rows = inst.target.numpy(), {}
        t0 = time.perf_counter()
        items, _ = rank_with_backbone(policy, inst, table, trie, args.beam, args.batch, exclude_history=excl)
        rows["beam"], per_user[split]["beam"] = metrics_of(items, targets)
        rows["beam"]["wall_s"] = time.perf_counter() - t0
        for name, change in PRIORITIES.items():
            t0 = time.perf_counter()
            items, _ = rank_with_ved(policy, inst, table, trie, VEDConfig(**{**meta["ved_test"], **change}), value_for,
                                     args.batch, exclude_history=excl)
            rows[name], per_user[split][name] = metrics_of(items, targets)
            rows[name]["wall_s"] = time.perf_counter() - t0
            print(split, name, round(rows[name]["recall@10"], 4), flush=True)
        out[split] = {"users": len(inst), "metrics": rows}
    out["test"]["paired"] = {
        name: {f"vs_{ref}": {k: M.paired_bootstrap(per_user["test"][ref][k], per_user["test"][name][k],
                                                     params.evaluate.bootstrap, 0)
                             for k in ("recall@10", "ndcg@10")}
               for ref in ("reference", "beam") if ref != name}
        for name in PRIORITIES}
    save(f"ved_priority_{params.data.dataset}{args.tag}", {**stamp(vars(args)), **out})
    return out


if __name__ == "__main__":
    main()
