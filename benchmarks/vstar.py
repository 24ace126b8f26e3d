"""V-STAR on one dataset: SASRec, TIGER, TIGER-RL (plain GRPO on beam candidates), V-STAR (beam at
test) and V-STAR+VED, from the outputs of the backbone, sasrec and vstar stages; every choice on
the validation split, the test split read once per configuration.

    python -m benchmarks.vstar [-S data.data_dir=...] [--sources learned cf sum:0.5] [--users 300]
        [--valid-users 3000] [--test-users 0] [--tag _x]

- Validation: every method ranked; VED's value source (learned V_phi, SASRec's V_cf, or
  V_phi + w V_cf) chosen by validation Recall@10 (then NDCG@10, then the order given).
- Test: each method once (VED with the chosen source): Recall@5/10/100/200, NDCG@5/10, 95%
  bootstrap intervals of Recall@10 and NDCG@10, paired bootstrap tests of every method against
  TIGER and against SASRec (grc_core.metrics).
- Value quality: on validation users, the candidates sampled from the V-STAR policy
  (`vstar.value.samples` per user), the dense semantic step rewards, the realised discounted
  return G_l of each prefix and the value of the same prefix: Pearson and Spearman correlation by
  level, for V_phi and for V_cf.
- A policy whose weights are the backbone's (RL selection kept iteration 0) is ranked once: its
  rows reuse TIGER's ranks, marked `same_weights_as`, with no wall time of their own.
- Cost: users/s and backbone forward tokens per user of VED (`vstar.ved_test`) against the beam at
  20 and 200, on the same test users, one after another in this process.
Writes benchmarks/results/vstar_<dataset><tag>.json.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch

from benchmarks.common import commit, save, stamp
from grc_core import metrics as M
from grc_core.cf_value import item_prefix_nodes, prefix_values
from grc_core.config import VEDConfig
from grc_core.data import to_batch
from grc_core.evaluation import history_mask, rank_with_backbone
from grc_core.grc import expand_memory
from grc_core.value import candidate_values, discounted_returns, sample_candidates, semantic_step_rewards
from grc_core.ved import CFValue, ValueQuery, forward_tokens_of_beam, rank_with_ved, ved_decode
from tasks.artifacts import (item_index, load_backbone, load_baseline, load_split, load_value_head,
                             model_dir, sasrec_log_probs, sasrec_top, subset, ved_value)
from tasks.params import load_params
from tasks.vstar import item_embeddings

KS, NDCG = (5, 10, 20, 50, 100, 200), (5, 10)


def metrics_of(ranked: np.ndarray, targets: np.ndarray) -> tuple[dict, dict]:
    per_user = M.per_user_metrics(M.target_ranks(ranked, targets), KS, NDCG)
    return {k: float(v.mean()) for k, v in per_user.items()}, per_user


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two models hold exactly the same parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def parse_source(source: str) -> tuple[str, float]:
    """`learned` | `cf` | `sum:w` -> (the value source, the weight of V_cf in a sum)."""
    name, _, w = source.partition(":")
    return name, float(w or 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-S", action="append", default=[], dest="overrides")
    ap.add_argument("--sources", nargs="+", default=["learned", "cf", "sum:0.25", "sum:1"])
    ap.add_argument("--beam", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--value_users", type=int, default=500)
    ap.add_argument("--users", type=int, default=0, help="validation and test users (0: all), a fixed subset")
    ap.add_argument("--valid-users", type=int, default=None, help="validation users (0: all); default --users")
    ap.add_argument("--test-users", type=int, default=None, help="test users (0: all); default --users")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    n_valid = args.users if args.valid_users is None else args.valid_users
    n_test = args.users if args.test_users is None else args.test_users
    params = load_params(None, args.overrides)
    torch.set_num_threads(params.vstar.threads or torch.get_num_threads())
    out_dir, vp = params.dataset_dir(), params.vstar
    attrs, excl_on = params.dataset.attributes, params.data.exclude_history
    table, trie, _, _ = item_index(out_dir, attrs, "cpu")
    n_items = table.codes.shape[0]
    valid = subset(load_split(out_dir, "valid", params.data.max_history), n_valid, params.evaluate.users_seed)
    test = subset(load_split(out_dir, "test", params.data.max_history), n_test, params.evaluate.users_seed)
    sasrec = load_baseline(out_dir)
    item_logp = sasrec_log_probs(sasrec)
    nodes = item_prefix_nodes(trie)
    models = {"tiger": load_backbone(out_dir),
              **{m: load_backbone(out_dir, "cpu", model_dir(out_dir, m) / "model.safetensors") for m in ("tiger_rl", "vstar")}}
    alias = {m: "tiger" for m in ("tiger_rl", "vstar") if same_weights(models[m], models["tiger"])}
    head, meta = load_value_head(out_dir)
    ved_cfg = VEDConfig(**meta["ved_test"])

    @functools.cache  # one SASRec load per value source, however often VED decodes with it
    def value_for(source: str):
        return ved_value(head, out_dir, trie, *parse_source(source))

    ranked: dict = {}  # (method, split) -> items of the beam-ranked methods, reused by their aliases

    def rank(method: str, inst, source: str = "learned") -> tuple[np.ndarray, float | None]:
        if method in alias:
            return ranked[alias[method], id(inst)], None
        t0 = time.perf_counter()
        if method == "sasrec":
            items, _ = sasrec_top(sasrec, inst, args.beam, 256, excl_on)
        elif method == "vstar_ved":
            items, _ = rank_with_ved(models["vstar"], inst, table, trie, ved_cfg, value_for(source), args.batch,
                                     exclude_history=excl_on)
        else:
            items, _ = rank_with_backbone(models[method], inst, table, trie, args.beam, args.batch,
                                          exclude_history=excl_on)
            ranked[method, id(inst)] = items
        return items, time.perf_counter() - t0

    out: dict = {"dataset": params.data.dataset, "params_hash": params.section_hash(),
                 "vstar_params_hash": params.section_hash("vstar"),
                 "commit": commit(),
                 "valid_users": len(valid), "test_users": len(test), "ved_test": meta["ved_test"],
                 "same_weights_as": alias}
    # Validation: every method, and VED's value source.
    val: dict = {}
    for method in ("sasrec", "tiger", "tiger_rl", "vstar"):
        items, wall = rank(method, valid)
        val[method] = {**metrics_of(items, valid.target.numpy())[0], "wall_s": wall}
        print("valid", method, val[method], flush=True)
    for source in args.sources:
        items, wall = rank("vstar_ved", valid, source)
        val[f"vstar_ved[{source}]"] = {**metrics_of(items, valid.target.numpy())[0], "wall_s": wall}
        print("valid ved", source, val[f"vstar_ved[{source}]"], flush=True)
    best = max(args.sources, key=lambda s: (val[f"vstar_ved[{s}]"]["recall@10"], val[f"vstar_ved[{s}]"]["ndcg@10"],
                                            -args.sources.index(s)))
    out["valid"], out["ved_source_chosen_on_valid"] = val, best
    # Test: once per configuration.
    test_per_user, test_res = {}, {}
    for method in ("sasrec", "tiger", "tiger_rl", "vstar", "vstar_ved"):
        items, wall = rank(method, test, best)
        summary, per_user = metrics_of(items, test.target.numpy())
        test_per_user[method] = per_user
        test_res[method] = {**summary, "wall_s": wall, "users_per_s": wall and len(test) / wall,
                            "ci95": {k: M.bootstrap_interval(per_user[k], params.evaluate.bootstrap, 0)
                                     for k in ("recall@10", "ndcg@10")}}
        print("test", method, test_res[method], flush=True)
    for method in test_res:
        for base in ("tiger", "sasrec"):
            if method != base:
                test_res[method][f"vs_{base}"] = {k: M.paired_bootstrap(test_per_user[base][k], test_per_user[method][k],
                                                                        params.evaluate.bootstrap, 0)
                                                  for k in ("recall@10", "ndcg@10", "recall@100")}
    out["test"] = test_res
    # Value quality on validation prefixes: V against the realised return, by level.
    emb = item_embeddings(params, n_items, "cpu")
    part = valid.select(torch.arange(min(args.value_users, len(valid))))
    batch = to_batch(part, table)
    exclude = history_mask(part.history, n_items) if excl_on else None
    with torch.no_grad():
        cand = sample_candidates(models["vstar"], batch, trie, vp.value.samples, torch.Generator().manual_seed(0), exclude)
        weights = torch.tensor(vp.value.level_weights)
        r = semantic_step_rewards(cand, batch.target_codes, emb, part.target, weights)
        ret = discounted_returns(r, vp.value.gamma)  # (B, C, L)
        memory = expand_memory(models["vstar"].encode(batch), cand.codes.shape[1])
        v_phi = candidate_values(models["vstar"], head, memory, cand.codes)  # (B, C, L)
        cf = CFValue(prefix_values(item_logp(part), nodes, trie, exclude))
        b, c, n_levels = cand.codes.shape
        depth = torch.arange(1, n_levels + 1).expand(b, c, n_levels)
        node_ids = torch.zeros(b, c, n_levels, dtype=torch.long)
        cur = torch.zeros(b, c, dtype=torch.long)
        for level in range(n_levels):
            cur = trie.next_nodes(level, cur, cand.codes[..., level])
            node_ids[..., level] = cur
        v_cf = torch.stack([cf(ValueQuery(torch.zeros(b, c, 1, 1), depth[..., lv], node_ids[..., lv]))
                            for lv in range(n_levels)], -1)
    live = cand.live.numpy()
    quality = {}
    for lv in range(n_levels):
        g = ret[..., lv].numpy()[live]
        quality[f"level_{lv + 1}"] = {
            "pearson_v_phi": float(np.corrcoef(v_phi[..., lv].numpy()[live], g)[0, 1]),
            "spearman_v_phi": spearman(v_phi[..., lv].numpy()[live], g),
            "pearson_v_cf": float(np.corrcoef(v_cf[..., lv].numpy()[live], g)[0, 1]),
            "spearman_v_cf": spearman(v_cf[..., lv].numpy()[live], g),
            "return_mean": float(g.mean()), "return_std": float(g.std()), "prefixes": int(live.sum())}
    out["value_quality_valid"] = quality
    # Cost: VED against the beam at 20 and 200 on the same test users.
    cost: dict = {}
    n_cost = min(len(test), 512)
    tpart = test.select(torch.arange(n_cost))
    for width in (20, 200):
        t0 = time.perf_counter()
        rank_with_backbone(models["vstar"], tpart, table, trie, width, args.batch, exclude_history=excl_on)
        wall = time.perf_counter() - t0
        cost[f"beam_{width}"] = {"users_per_s": n_cost / wall, "forward_tokens_per_user": forward_tokens_of_beam(trie, width)}
    spent, t0 = [], time.perf_counter()
    vf = value_for(best)
    for start in range(0, n_cost, args.batch):
        p = tpart.select(torch.arange(start, min(start + args.batch, n_cost)))
        ex = history_mask(p.history, n_items) if excl_on else None
        spent.append(ved_decode(models["vstar"], to_batch(p, table, with_target=False), trie, ved_cfg, vf(p, ex), ex,
                                torch.Generator().manual_seed(0)).cost)
    wall = time.perf_counter() - t0
    cost["ved_test"] = {"users_per_s": n_cost / wall, "forward_tokens_per_user": float(torch.cat(spent).float().mean()),
                        "budget": ved_cfg.budget, "init_beam": ved_cfg.init_beam, "value": best}
    out["cost"] = {"users": n_cost, **cost}
    save(f"vstar_{params.data.dataset}{args.tag}", {**stamp(vars(args)), **out})


if __name__ == "__main__":
    main()
