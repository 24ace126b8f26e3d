"""A dense head on TIGER (`backbone.model.dense_head`) as a second value in its beam, against the
same run's plain backbone, SASRec and `tiger_cf`; every weight chosen on the validation split.

    python -m benchmarks.dense_head -S data.data_dir=<dense run>/data [-S ...] \
        --base <plain run>/data [--dense-weights 0 1 2 4] [--cf-weights 0 1 2 4 8] [--tag _s2028]

The dense run is a copy of the plain run with only the backbone trained again under
`-S backbone.model.dense_head=true` (`benchmarks.variant_runs`), so both hold the same inputs of
the backbone stage: splits, items, semantic IDs, SASRec (checked by their hashes). Each beam of
`--beam` prunes every level on log pi + a V_dense + b V_SASRec, each V the log of the model's
item mass under the prefix (grc_core/cf_value.py; `rank_with_backbone`'s `experts`). Families
of (a, b):
- `tiger` (0, 0); `tiger_cf` (0, b > 0): the pipeline's method, on the dense run's backbone;
- `tiger_dense` (a > 0, 0): the backbone steered by its own dense head alone;
- `tiger_dense_cf` (a > 0, b > 0): both;
- `base_tiger`, `base_tiger_cf`: the plain run's backbone at (0, 0) and (0, b > 0), the reference;
- `dense`: the dense head's own top `--beam` items; `sasrec`: SASRec's (history excluded in all).
Each family's weights: the best validation Recall@10 (then NDCG@10, then the smaller a + b) over
all validation users; the test split is ranked once per family at those weights. Families have
grids of different sizes, so they are also compared by a 2-fold cross-fitted validation figure:
the weights chosen on one seeded half of the users are read on the other half, and the other way
round; those per-user ranks are what `eval_dense/valid/<family>.parquet` holds (the test ranks are
`eval_dense/<family>.parquet`), for `benchmarks.seeds_table --eval-subdir eval_dense[/valid]`.
Writes benchmarks/results/dense_head_<dataset><tag>.json.

    python -m benchmarks.dense_head --plot dense_head_ml-100k_s2028.json ... --name ml-100k

draws those runs' validation Recall@10 over the (a, b) grid, averaged over the runs, beside the
plain backbone's (a = 0) row: benchmarks/results/dense_head_grid_<name>.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.cf_fusion import masked_log_probs
from benchmarks.common import RESULTS, commit, save, stamp
from grc_core import metrics as M
from grc_core.evaluation import dense_item_logp, rank_with_backbone
from tasks.artifacts import (item_index, load_backbone, load_baseline, load_split, sasrec_log_probs,
                             sasrec_top, subset)
from tasks.evaluate import save_ranks
from tasks.io import tree_sha256
from tasks.params import load_params
from tasks.stages import STAGES

FAMILIES = {"tiger": lambda a, b: a == 0 and b == 0, "tiger_cf": lambda a, b: a == 0 and b > 0,
            "tiger_dense": lambda a, b: a > 0 and b == 0, "tiger_dense_cf": lambda a, b: a > 0 and b > 0}


def same_run(dense_dir: Path, base_dir: Path) -> None:
    """Refuse a base whose backbone was trained from other inputs (the backbone stage's: splits,
    items, semantic IDs, SASRec) than the dense run's."""
    for rel in STAGES["backbone"].inputs:
        if tree_sha256(dense_dir / rel) != tree_sha256(base_dir / rel):
            raise ValueError(f"{base_dir / rel} differs from {dense_dir / rel}: --base must be the plain run the "
                             "dense run was copied from (benchmarks.variant_runs)")


def grid_ranks(backbone, inst, table, trie, beam: int, batch: int, excl: bool, sas, dense, grid) -> tuple[dict, dict]:
    """Target ranks of the beam at every (a, b) of `grid`, and the seconds each decode took."""
    ranks, seconds = {}, {}
    for a, b in grid:
        t0 = time.perf_counter()
        items, _ = rank_with_backbone(backbone, inst, table, trie, beam, batch, exclude_history=excl,
                                      experts=[(dense, a), (sas, b)])
        seconds[(a, b)] = time.perf_counter() - t0
        ranks[(a, b)] = M.target_ranks(items, inst.target.numpy())
        recall = float(M.per_user_metrics(ranks[(a, b)], (10,), ())["recall@10"].mean())
        print(f"  a {a:g} b {b:g}: R@10 {recall:.4f} ({seconds[(a, b)]:.0f} s)", flush=True)
    return ranks, seconds


def best(points, per_user: dict, rows: np.ndarray | None = None):
    """The point with the highest mean R@10 (then N@10, then the smaller a + b) over `rows` (all: None)."""
    def key(p):
        m = per_user[p] if rows is None else {k: v[rows] for k, v in per_user[p].items()}
        return (float(m["recall@10"].mean()), float(m["ndcg@10"].mean()), -sum(p))
    return max(points, key=key)


def cross_fitted(points, ranks: dict, per_user: dict, seed: int = 0) -> tuple[np.ndarray, list]:
    """Per-user ranks under 2-fold cross-fitting: the point chosen on one half read on the other
    (`per_user`: each point's per-user R@10 and N@10, as `best` reads them)."""
    n = len(next(iter(ranks.values())))
    halves = np.array_split(np.random.default_rng(seed).permutation(n), 2)
    out, chosen = np.zeros(n, dtype=np.int64), []
    for fit, check in (halves, halves[::-1]):
        p = best(points, per_user, fit)
        out[check] = ranks[p][check]
        chosen.append(list(p))
    return out, chosen


def paired(per_user: dict, against: str, n_boot: int) -> dict:
    return {name: {k: M.paired_bootstrap(per_user[against][k], m[k], n_boot, 0) for k in ("recall@10", "ndcg@10")}
            for name, m in per_user.items() if name != against}


def plot_grid(reports: list[dict], path: Path) -> np.ndarray:
    """Validation R@10 over the (a, b) grid, averaged over `reports`, under the plain backbone's
    row (a = 0): the (1 + A, B) table drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(reports[0]["valid"]["grid_recall@10"])
    points = sorted({tuple(float(x) for x in k.split(",")) for k in keys})
    a_s, b_s = sorted({p[0] for p in points}), sorted({p[1] for p in points})
    grid = np.array([[np.mean([r["valid"]["grid_recall@10"][f"{a:g},{b:g}"] for r in reports]) for b in b_s]
                     for a in a_s])  # (A, B)
    base = np.array([[np.mean([r["valid"]["base_grid_recall@10"][f"0,{b:g}"] for r in reports]) for b in b_s]])
    table = np.vstack([base, grid])  # (1 + A, B)
    fig, ax = plt.subplots(figsize=(1.2 * len(b_s) + 2, 0.8 * len(table) + 1.5))
    im = ax.imshow(table, cmap="viridis")
    for i, row in enumerate(table):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.4f}", ha="center", va="center", color="white" if v < table.mean() else "black")
    ax.set_xticks(range(len(b_s)), [f"{b:g}" for b in b_s])
    ax.set_yticks(range(len(table)), ["plain backbone, a = 0"] + [f"dense backbone, a = {a:g}" for a in a_s])
    ax.set_xlabel("b, weight of SASRec's prefix value")
    ax.set_title(f"Validation R@10 (all users), mean of {len(reports)} runs")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--base", type=Path, help="the plain run's data dir (data.data_dir)")
    ap.add_argument("--plot", type=Path, nargs="+", help="draw the grids of these JSONs instead of ranking")
    ap.add_argument("--name", default="", help="with --plot: the PNG's name")
    ap.add_argument("--dense-weights", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    ap.add_argument("--cf-weights", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--beam", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--valid-users", type=int, default=0, help="validation users (0: all)")
    ap.add_argument("--test-users", type=int, default=0, help="test users (0: all)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.plot:
        path = RESULTS / f"dense_head_grid_{args.name}.png"
        table = plot_grid([json.loads(p.read_text()) for p in args.plot], path)
        print(path)
        return {"plot": str(path), "table": table.tolist()}
    if args.base is None:
        ap.error("--base is required to rank")
    params = load_params(overrides=args.set)
    out_dir, base_dir = params.dataset_dir(), args.base / params.data.dataset
    same_run(out_dir, base_dir)
    if not params.backbone.model.dense_head:
        raise ValueError("benchmarks.dense_head: give the dense run's settings, -S backbone.model.dense_head=true")
    grid = [(a, b) for a in sorted(set(args.dense_weights)) for b in sorted(set(args.cf_weights))]
    base_grid = [(0.0, b) for b in sorted(set(args.cf_weights))]
    report = stamp({"overrides": args.set, "base": str(args.base), "grid": grid, "beam": args.beam,
                    "valid_users": args.valid_users, "test_users": args.test_users})
    report.update(commit=commit(), dataset=params.data.dataset,
                  params_hash=params.section_hash("data", "backbone", "sasrec", "evaluate"))
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    model, base = load_backbone(out_dir), load_backbone(base_dir)
    sasrec = load_baseline(out_dir)
    sas, dense = sasrec_log_probs(sasrec), dense_item_logp(model, table)
    excl, seed = params.data.exclude_history, params.evaluate.users_seed

    def split_ranks(split: str, points: dict | None) -> tuple[dict, np.ndarray]:
        inst = subset(load_split(out_dir, split, params.data.max_history), getattr(args, f"{split}_users"), seed)
        print(f"{split}: {len(inst)} users", flush=True)
        mine = grid if points is None else sorted({p for f, p in points.items() if not f.startswith("base_")})
        theirs = base_grid if points is None else sorted({p for f, p in points.items() if f.startswith("base_")})
        ranks, seconds = grid_ranks(model, inst, table, trie, args.beam, args.batch, excl, sas, dense, mine)
        print("  base backbone:", flush=True)
        base_ranks, base_seconds = grid_ranks(base, inst, table, trie, args.beam, args.batch, excl, sas, None, theirs)
        fixed = {"sasrec": sasrec_top(sasrec, inst, args.beam, args.batch, excl)[0]}
        scores = masked_log_probs(dense, inst, args.batch, excl).numpy()  # (U, N), the history -inf
        fixed["dense"] = np.argsort(-scores, axis=1, kind="stable")[:, :args.beam]
        fixed = {k: M.target_ranks(v, inst.target.numpy()) for k, v in fixed.items()}
        timing = {"users": len(inst), **{f"{a:g},{b:g}": s for (a, b), s in seconds.items()},
                  **{f"base {a:g},{b:g}": s for (a, b), s in base_seconds.items()}}
        return {"dense": ranks, "base": base_ranks, "fixed": fixed, "timing": timing}, inst.user.numpy()

    valid, valid_users = split_ranks("valid", None)
    per_point = {p: M.per_user_metrics(r, (10,), (10,)) for p, r in valid["dense"].items()}
    per_base = {p: M.per_user_metrics(r, (10,), (10,)) for p, r in valid["base"].items()}
    chosen, crossed, crossed_points = {}, {}, {}
    for fam, rule in FAMILIES.items():
        points = [p for p in grid if rule(*p)]
        chosen[fam] = best(points, per_point)
        crossed[fam], crossed_points[fam] = cross_fitted(points, valid["dense"], per_point)
    for fam, rule in (("base_tiger", FAMILIES["tiger"]), ("base_tiger_cf", FAMILIES["tiger_cf"])):
        points = [p for p in base_grid if rule(*p)]
        chosen[fam] = best(points, per_base)
        crossed[fam], crossed_points[fam] = cross_fitted(points, valid["base"], per_base)
    crossed.update(valid["fixed"])
    for name, r in crossed.items():
        save_ranks(out_dir, name, valid_users, r, "valid", root="eval_dense")
    v_user = {name: M.per_user_metrics(r, (10, 20), (10,)) for name, r in crossed.items()}
    report["valid"] = {
        "users": len(valid_users),
        "grid_recall@10": {f"{a:g},{b:g}": float(m["recall@10"].mean()) for (a, b), m in per_point.items()},
        "base_grid_recall@10": {f"{a:g},{b:g}": float(m["recall@10"].mean()) for (a, b), m in per_base.items()},
        "chosen": {f: list(p) for f, p in chosen.items()},
        "chosen_recall@10": {f: float((per_base if f.startswith("base_") else per_point)[p]["recall@10"].mean())
                             for f, p in chosen.items()},
        "cross_fitted": {"chosen_per_half": crossed_points,
                         "metrics": {n: {k: float(v.mean()) for k, v in m.items()} for n, m in v_user.items()},
                         "vs_base_tiger_cf": paired(v_user, "base_tiger_cf", args.bootstrap),
                         "vs_sasrec": paired(v_user, "sasrec", args.bootstrap)},
        "seconds": valid["timing"]}
    print("validation, cross-fitted R@10:", {n: round(m["recall@10"], 4)
                                             for n, m in report["valid"]["cross_fitted"]["metrics"].items()},
          "chosen:", report["valid"]["chosen"], flush=True)

    test, test_users = split_ranks("test", chosen)
    ranks = {f: (test["base"] if f.startswith("base_") else test["dense"])[p] for f, p in chosen.items()}
    ranks.update(test["fixed"])
    for name, r in ranks.items():
        save_ranks(out_dir, name, test_users, r, root="eval_dense")
    t_user = {name: M.per_user_metrics(r, (5, 10, 20, 50, 100, 200), (5, 10)) for name, r in ranks.items()}
    report["test"] = {"users": len(test_users),
                      "metrics": {n: {k: float(v.mean()) for k, v in m.items()} for n, m in t_user.items()},
                      "ci95": {n: {k: M.bootstrap_interval(m[k], args.bootstrap, 0) for k in ("recall@10", "ndcg@10")}
                               for n, m in t_user.items()},
                      "vs_sasrec": paired(t_user, "sasrec", args.bootstrap),
                      "vs_base_tiger_cf": paired(t_user, "base_tiger_cf", args.bootstrap),
                      "seconds": test["timing"]}
    print("test R@10:", {n: round(m["recall@10"], 4) for n, m in report["test"]["metrics"].items()}, flush=True)
    save(f"dense_head_{params.data.dataset}{args.tag}", report)
    return report


if __name__ == "__main__":
    main()
