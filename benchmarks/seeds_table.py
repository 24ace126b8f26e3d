"""Mean ± std over seeds of the evaluate stage's test metrics, from its per-user rank files.

    python -m benchmarks.seeds_table --dataset scientific --dirs data_s0 data_s1 data_s2 \
        --methods tiger gc_sft grc_sft grc_rl --out benchmarks/results/seeds_scientific.json

Each seed's pipeline ran in its own data dir (`-S data.data_dir=data_s<k>`). For every seed the
methods are scored on the users that all of them were evaluated on (the `evaluate.users`
subset, the same users for every seed since `evaluate.users_seed` is fixed), with a paired
bootstrap against the first method (TIGER). Prints a markdown table: per seed, then mean ± std
(sample std over seeds) with, where every seed ranked the same users, each method against the
first on the seed-averaged per-user metric (`seed_averaged`). The method name `champion` stands
for each seed's validation champion (its `eval/leaderboard.json`): what that seed's candidate
dump would serve. With `--champion-default M` (and `--champion-p`) the champion is chosen again
from the seed's validation rank files (`eval/valid/`, every method evaluate ranked) by the
leaderboard's own rule with that default (`tasks.evaluate.leaderboard`; "" for the highest
validation Recall@10 outright): what the seed would have served under that rule.

With `--against D1 D2 ...` (the data dirs of another configuration, one per seed, in the order of
`--dirs`: the same seeds) each method is also compared with itself under that configuration:
per user, its metric averaged over the seeds in each configuration, then the paired bootstrap over
users (`vs_against`: this configuration minus the other). The users must be the same in every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.common import commit, stamp
from grc_core import metrics as M
from tasks.evaluate import leaderboard
from tasks.io import write_json

KEYS = ("recall@5", "recall@10", "recall@100", "recall@200", "ndcg@5", "ndcg@10")


CHAMPION = "champion"  # a method name that stands for the seed's validation champion (eval/leaderboard.json)


def aligned_ranks(frames: dict[str, pl.DataFrame], where: Path) -> tuple[list[int], dict[str, np.ndarray]]:
    """(the users every rank file holds, in user order; each method's ranks of them in that order)."""
    users = set.intersection(*(set(frame["user_id"].to_list()) for frame in frames.values()))
    if not users:
        raise ValueError(f"{where}: the rank files of {list(frames)} share no user")
    order = sorted(users)
    ranks = {}
    for m, frame in frames.items():
        by_user = dict(zip(frame["user_id"].to_list(), frame["rank"].to_list()))
        ranks[m] = np.asarray([by_user[u] for u in order])
    return order, ranks


def rechosen_champion(eval_dir: Path, default: str, p: float, n_boot: int) -> dict:
    """The leaderboard `tasks.evaluate.leaderboard` makes from the validation rank files under
    `eval_dir/valid/` with `default` and `p` (the users every file holds), less its per-method
    rows: the champion, the rule, the default's challenge, the margin."""
    files = sorted((eval_dir / "valid").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{eval_dir / 'valid'}: no validation rank files to choose a champion from")
    _, ranks = aligned_ranks({f.stem: pl.read_parquet(f) for f in files}, eval_dir / "valid")
    board = leaderboard(ranks, 200, n_boot, 0, default, p)  # beam 200: every cut-off; the rule reads Recall@10
    board["valid_recall@10"] = {m["method"]: m["metrics"]["recall@10"] for m in board.pop("methods")}
    return board


def seed_rows(eval_dir: Path, methods: list[str], n_boot: int,
              rule: tuple[str, float] | None = None) -> tuple[dict, list[int], dict]:
    """(the seed's JSON entry, its users in order, each method's per-user metrics in that order).
    The method `champion` is the test ranks of the method the seed's leaderboard chose on
    validation, or, with `rule` = (default, p), the one that rule chooses from `eval/valid/`."""
    chosen, board = {}, None
    path = eval_dir / "leaderboard.json"
    recorded = json.loads(path.read_text()) if path.is_file() else None
    if CHAMPION in methods:
        if rule is None and recorded is None:
            raise FileNotFoundError(f"{path}: no leaderboard to read the champion from")
        board = recorded if rule is None else rechosen_champion(eval_dir, *rule, n_boot)
        chosen[CHAMPION] = board["champion"]
    order, ranks = aligned_ranks({m: pl.read_parquet(eval_dir / f"{chosen.get(m, m)}.parquet") for m in methods},
                                 eval_dir)
    out, per_user = {}, {}
    for m, r in ranks.items():
        per_user[m] = M.per_user_metrics(r, M.DEFAULT_KS, M.NDCG_KS)
        out[m] = {"metrics": M.summarize(per_user[m])}
    base = methods[0]
    for m in methods[1:]:
        out[m]["vs_" + base] = {k: M.paired_bootstrap(per_user[base][k], per_user[m][k], n_boot, 0)
                                for k in ("recall@10", "ndcg@10")}
    entry = {"users": len(order), "methods": out}
    if recorded is not None and "tiger_cf_weight" in recorded:
        entry["tiger_cf_weight"] = recorded["tiger_cf_weight"]["chosen"]  # the w its tiger_cf ranks were made with
    if chosen:
        entry["champion"] = chosen[CHAMPION]
        if rule is not None:
            entry["leaderboard"] = board
    return entry, order, per_user


def seed_mean(runs: list[tuple[list[int], dict]], methods: list[str]) -> dict:
    """Each method's per-user Recall@10 and NDCG@10 averaged over the seeds (runs over the same users)."""
    return {m: {k: np.mean([pu[m][k] for _, pu in runs], axis=0) for k in ("recall@10", "ndcg@10")} for m in methods}


def seed_averaged(runs: list[tuple[list[int], dict]], base: str, methods: list[str], n_boot: int) -> dict:
    """Each method against `base` over seeds that ranked the same users: per user, the metric
    averaged over the seeds; then the paired bootstrap over users. The users are the unit resampled
    (the same users under every seed are not independent draws); the seeds' models are the ones
    trained. Empty where the seeds' users differ."""
    if len(runs) < 2 or any(order != runs[0][0] for order, _ in runs):
        return {}
    mean = seed_mean(runs, methods)
    return {m: {k: M.paired_bootstrap(mean[base][k], mean[m][k], n_boot, 0) for k in ("recall@10", "ndcg@10")}
            for m in methods if m != base}


def against(runs: list[tuple[list[int], dict]], other: list[tuple[list[int], dict]], methods: list[str],
            n_boot: int) -> dict:
    """Each method of `runs` against the same method of `other` (another configuration, the same
    seeds in the same order): per user, the metric averaged over the seeds in each, then the
    paired bootstrap over users, `runs` minus `other`. Refuses runs over different users."""
    if len(runs) != len(other):
        raise ValueError(f"--against names {len(other)} data dirs for {len(runs)} seeds: give one per seed, in order")
    if any(order != runs[0][0] for order, _ in runs + other):
        raise ValueError("--against: the runs ranked different users; a paired comparison needs the same ones")
    new, old = seed_mean(runs, methods), seed_mean(other, methods)
    return {m: {k: M.paired_bootstrap(old[m][k], new[m][k], n_boot, 0) for k in ("recall@10", "ndcg@10")}
            for m in methods}


def seed_pairs(dirs: list[str], seeds: dict, other_dirs: list[str], other: list[dict], methods: list[str]) -> dict:
    """Per method, each seed's Recall@10 and NDCG@10 in both configurations and their difference
    (`dirs` minus `other_dirs`, paired by position): what `benchmarks.seed_deltas` tests over seeds."""
    out = {m: [] for m in methods}
    for d, o, row in zip(dirs, other_dirs, other):
        for m in methods:
            new, old = seeds[d]["methods"][m]["metrics"], row["methods"][m]["metrics"]
            pair = {"dir": d, "against": o}
            for k in ("recall@10", "ndcg@10"):
                pair |= {k: new[k], f"{k}_against": old[k], f"{k}_diff": new[k] - old[k]}
            out[m].append(pair)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--dirs", nargs="+", required=True, help="data dirs, one per seed")
    ap.add_argument("--methods", nargs="+", default=["tiger", "gc_sft", "grc_sft", "grc_rl"])
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--eval-subdir", default="eval",
                    help="where under data/<dataset>/ the rank files are (eval_fusion: benchmarks.cf_fusion --save-ranks)")
    ap.add_argument("--champion-default", default=None,
                    help="choose `champion` again from eval/valid/ with this default ('' = none; unset: leaderboard.json)")
    ap.add_argument("--champion-p", type=float, default=0.05, help="with --champion-default: the challenge p")
    ap.add_argument("--against", nargs="+", default=None,
                    help="data dirs of another configuration, one per seed in the order of --dirs (vs_against)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    rule = None if a.champion_default is None else (a.champion_default, a.champion_p)
    rows = {d: seed_rows(Path(d) / a.dataset / a.eval_subdir, a.methods, a.bootstrap, rule) for d in a.dirs}
    seeds = {d: r[0] for d, r in rows.items()}
    pooled = seed_averaged([r[1:] for r in rows.values()], a.methods[0], a.methods, a.bootstrap)
    versus, per_seed = {}, {}
    if a.against:
        other_rows = [seed_rows(Path(d) / a.dataset / a.eval_subdir, a.methods, a.bootstrap, rule) for d in a.against]
        versus = against([r[1:] for r in rows.values()], [r[1:] for r in other_rows], a.methods, a.bootstrap)
        per_seed = seed_pairs(a.dirs, seeds, a.against, [r[0] for r in other_rows], a.methods)
    summary = {}
    for m in a.methods:
        vals = {k: [seeds[d]["methods"][m]["metrics"][k] for d in a.dirs] for k in KEYS}
        summary[m] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                      for k, v in vals.items()}
    base = a.methods[0]
    print("| method | seed (data dir) | users | R@5 | R@10 | N@5 | N@10 | R@100 | R@200 | R@10 − " + base + " [95% CI], p |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in a.methods:
        for d in a.dirs:
            row = seeds[d]["methods"][m]
            r = row["metrics"]
            vs = row.get("vs_" + base, {}).get("recall@10")
            cmp = f"{vs['diff']:+.4f} [{vs['ci_low']:+.4f}, {vs['ci_high']:+.4f}], {vs['p_value']:.2f}" if vs else ""
            print(f"| {m} | {d} | {seeds[d]['users']} | {r['recall@5']:.4f} | {r['recall@10']:.4f} | {r['ndcg@5']:.4f} | "
                  f"{r['ndcg@10']:.4f} | {r['recall@100']:.4f} | {r['recall@200']:.4f} | {cmp} |")
    print()
    print("| method | R@5 | R@10 | N@5 | N@10 | R@100 | R@200 | R@10 − " + base + ", seed-averaged per user [95% CI], p |")
    print("|---|---|---|---|---|---|---|---|")
    order = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "recall@100", "recall@200")
    for m in a.methods:
        vs = pooled.get(m, {}).get("recall@10")
        cmp = f"{vs['diff']:+.4f} [{vs['ci_low']:+.4f}, {vs['ci_high']:+.4f}], {vs['p_value']:.3f}" if vs else ""
        print(f"| {m} | " + " | ".join(f"{summary[m][k]['mean']:.4f} ± {summary[m][k]['std']:.4f}" for k in order)
              + f" | {cmp} |")
    if versus:
        print()
        print("| method | R@10 − the same method under --against, seed-averaged per user [95% CI], p | N@10 − the same, p |")
        print("|---|---|---|")
        for m, vs in versus.items():
            r, n = vs["recall@10"], vs["ndcg@10"]
            print(f"| {m} | {r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}], {r['p_value']:.3f} | "
                  f"{n['diff']:+.4f}, {n['p_value']:.3f} |")
    payload = {**stamp({"eval_subdir": a.eval_subdir, "bootstrap": a.bootstrap}), "commit": commit(),
               "dataset": a.dataset, "dirs": a.dirs, "methods": a.methods, "seeds": seeds, "mean_std": summary}
    if rule is not None:
        payload["champion_rule"] = {"default": rule[0], "p": rule[1]}
    if pooled:
        payload["seed_averaged_vs_" + base] = pooled
    if versus:
        payload["against"] = a.against
        payload["vs_against"] = versus
        payload["per_seed_vs_against"] = per_seed
    if a.out is not None:
        write_json(a.out, payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
