"""What a paired test on one dataset's users can detect: the smallest Recall@10 difference between
two methods that reaches p < 0.05, and how many users a +5% difference would need.

    python -m benchmarks.power --dataset ml-100k --dir /tmp/ml/data --pairs vstar_ved:tiger tiger_cf:sasrec

Reads the evaluate stage's per-user rank files (<dir>/<dataset>/eval/<method>.parquet) of each pair
`a:b`, on the users both cover. Per user d = hit@10(a) − hit@10(b); with n users, sd = the sample
standard deviation of d and SE = sd / sqrt(n) (the normal approximation of the paired bootstrap the
other benchmarks run):
- `p05_threshold` = 1.96 SE: the smallest |mean d| a two-sided test at 0.05 calls significant;
- `mde80` = (1.96 + 0.84) SE: the difference it detects with 80% power;
- `users_for_5pct` = (2.80 sd / (0.05 R@10(b)))^2: the users (at this sd) that would detect a +5%
  relative difference over b with 80% power.
Writes benchmarks/results/power_<dataset><tag>.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.common import commit, save, stamp
from grc_core import metrics as M

Z_05, Z_80 = 1.959964, 0.841621


def hits(path: Path) -> dict[int, float]:
    """Recall@10 per user of one rank file (1-based target ranks, 0 = not retrieved)."""
    frame = pl.read_parquet(path)
    hit = M.per_user_metrics(frame["rank"].to_numpy(), (10,), ())["recall@10"]
    return dict(zip(frame["user_id"].to_list(), hit.tolist()))


def power_of(a: dict[int, float], b: dict[int, float]) -> dict:
    users = sorted(set(a) & set(b))
    if len(users) < 2:
        raise ValueError(f"power_of: the two rank files share {len(users)} users")
    ha, hb = np.array([a[u] for u in users]), np.array([b[u] for u in users])
    d = ha - hb
    n, sd = len(d), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    base = float(hb.mean())
    return {"users": n, "recall@10_a": float(ha.mean()), "recall@10_b": base, "diff": float(d.mean()),
            "relative": float(d.mean() / base) if base > 0 else float("nan"), "sd": sd, "se": se,
            "p05_threshold": Z_05 * se, "p05_threshold_relative": Z_05 * se / base if base > 0 else float("nan"),
            "mde80": (Z_05 + Z_80) * se, "mde80_relative": (Z_05 + Z_80) * se / base if base > 0 else float("nan"),
            "users_for_5pct": math.ceil(((Z_05 + Z_80) * sd / (0.05 * base)) ** 2) if base > 0 else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--dir", type=Path, required=True, help="the run's data dir (data.data_dir)")
    ap.add_argument("--pairs", nargs="+", required=True, metavar="A:B")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    report = stamp({"dataset": args.dataset, "dir": str(args.dir), "pairs": args.pairs})
    report["commit"] = commit()
    eval_dir = args.dir / args.dataset / "eval"
    report["pairs"] = {}
    for pair in args.pairs:
        a, _, b = pair.partition(":")
        got = power_of(hits(eval_dir / f"{a}.parquet"), hits(eval_dir / f"{b}.parquet"))
        report["pairs"][pair] = got
        print(f"{a} - {b}: {got['diff']:+.4f} ({got['relative']:+.1%}) on {got['users']} users; "
              f"p < 0.05 needs |diff| >= {got['p05_threshold']:.4f} ({got['p05_threshold_relative']:.1%}); "
              f"80% power at {got['mde80']:.4f} ({got['mde80_relative']:.1%}); +5% needs {got['users_for_5pct']} users",
              flush=True)
    save(f"power_{args.dataset}{args.tag}", report)
    return report


if __name__ == "__main__":
    main()
