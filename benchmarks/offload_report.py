"""Tables of offloaded GRPO runs (benchmarks.offload_grpo): test metrics, paired tests, training dynamics.

    python -m benchmarks.offload_report --runs benchmarks/results/offload/sci0_*.json \
        --base data_s0/scientific/eval/tiger.parquet --out benchmarks/results/grpo_ablations_scientific.json

For every run and every ranking it holds (best-on-validation policy, last policy, EGRS sweep):
Recall@5/10/100/200 and NDCG@5/10 on the test users, the paired bootstrap difference of Recall@10
and NDCG@10 against `--base` (a rank file of the evaluate stage, e.g. TIGER's, on the same users),
and means of the training log over blocks of iterations (rewards, draft and corrected hit rates,
copy rate, reflection accuracy, KL). Prints markdown tables; writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

from grc_core import metrics as M
from tasks.io import write_json

LOG_KEYS = ("reward_total", "reward_task", "reward_delta", "draft_hit", "corrected_hit", "copy_rate", "loc_acc", "kl")


def blocks(log: list[dict], size: int) -> list[dict]:
    out = []
    rows = [r for r in log if r.get("iteration", 0) > 0 and "reward_total" in r]
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        rec = {"iterations": f"{part[0]['iteration']}-{part[-1]['iteration']}"}
        rec.update({k: float(np.mean([r[k] for r in part])) for k in LOG_KEYS})
        vals = [r["valid_recall@10"] for r in part if "valid_recall@10" in r]
        rec["valid_recall@10_end"] = vals[-1] if vals else None
        out.append(rec)
    return out


def report(paths: list[Path], base: Path | None, n_boot: int, block: int) -> dict:
    base_ranks = None
    if base is not None:
        frame = pl.read_parquet(base)
        base_ranks = dict(zip(frame["user_id"].to_list(), frame["rank"].to_list()))
    runs = {}
    for path in paths:
        run = json.loads(path.read_text())
        users = np.asarray(run["test_users"])
        entry = {k: run[k] for k in ("name", "device", "overrides", "best_iteration", "best_valid_recall@10",
                                     "start_valid_recall@10", "episodes_per_s", "wall_s", "iterations")}
        entry["rankings"] = {}
        for label, ranks in run["test_ranks"].items():
            ranks = np.asarray(ranks)
            per_user = M.per_user_metrics(ranks, M.DEFAULT_KS, M.NDCG_KS)
            rec = {"metrics": M.summarize(per_user)}
            if base_ranks is not None:
                if not all(int(u) in base_ranks for u in users):
                    raise ValueError(f"{base}: not every test user of {path} has a rank there")
                b = np.asarray([base_ranks[int(u)] for u in users])
                pb = M.per_user_metrics(b, M.DEFAULT_KS, M.NDCG_KS)
                rec["base_metrics"] = M.summarize(pb)
                rec["vs_base"] = {k: M.paired_bootstrap(pb[k], per_user[k], n_boot, 0) for k in ("recall@10", "ndcg@10")}
            entry["rankings"][label] = rec
        entry["log_blocks"] = blocks(run["log"], block)
        runs[run["name"]] = entry
    return {"base": str(base) if base else None, "runs": runs}


def print_tables(rep: dict) -> None:
    print("| run | ranking | R@5 | R@10 | N@5 | N@10 | R@100 | R@200 | R@10 − base [95% CI], p | best it. | valid R@10 start → best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, run in rep["runs"].items():
        for label, rec in run["rankings"].items():
            m = rec["metrics"]
            vs = rec.get("vs_base", {}).get("recall@10")
            cmp = f"{vs['diff']:+.4f} [{vs['ci_low']:+.4f}, {vs['ci_high']:+.4f}], {vs['p_value']:.2f}" if vs else ""
            print(f"| {name} | {label} | {m['recall@5']:.4f} | {m['recall@10']:.4f} | {m['ndcg@5']:.4f} | "
                  f"{m['ndcg@10']:.4f} | {m['recall@100']:.4f} | {m['recall@200']:.4f} | {cmp} | "
                  f"{run['best_iteration']} | {run['start_valid_recall@10']:.4f} → {run['best_valid_recall@10']:.4f} |")
    print()
    print("| run | iterations | R | R_task | R_Δ | draft hit | corrected hit | copy rate | Acc_loc | KL | valid R@10 at end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, run in rep["runs"].items():
        for b in run["log_blocks"]:
            v = b["valid_recall@10_end"]
            print(f"| {name} | {b['iterations']} | {b['reward_total']:.2f} | {b['reward_task']:.2f} | "
                  f"{b['reward_delta']:.2f} | {b['draft_hit']:.3f} | {b['corrected_hit']:.3f} | {b['copy_rate']:.3f} | "
                  f"{b['loc_acc']:.3f} | {b['kl']:.3f} | {'' if v is None else f'{v:.4f}'} |")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--base", type=Path, default=None, help="rank file of the evaluate stage (user_id, rank)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--block", type=int, default=100, help="iterations per block of the training-log table")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    rep = report(a.runs, a.base, a.bootstrap, a.block)
    print_tables(rep)
    if a.out is not None:
        write_json(a.out, rep)
    return rep


if __name__ == "__main__":
    main(sys.argv[1:])
