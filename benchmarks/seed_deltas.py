"""A change tested over seeds: each seed's difference (change minus base) of one method's metric.

    python -m benchmarks.seed_deltas --name ml-100k_epochs10_valid --method tiger_cf \
        --json benchmarks/results/seeds_ml-100k_epochs10_s2028_vs_base_valid.json \
        --record 2026 0.2291 0.2238 --record 2027 0.2407 0.2344 \
        --record-source "benchmarks/RESULTS.md, 'A TIGER that knows more' (2026-12-05)"

`--json`: `benchmarks.seeds_table` outputs made with `--against` (their `per_seed_vs_against`:
each seed's figure in both configurations). `--record SEED CHANGE BASE`: a seed whose rank files
are gone, by the figures an earlier record gives (`--record-source` names it; the JSON keeps
both apart). The seed is the unit here, not the user: the paired per-user bootstrap of
`seeds_table` needs every seed's rank files, and says how sure one is of the average over the
users; this says whether the change helps from one training run to the next. Reported: each
seed's difference, their mean and sample sd, the one-sample t-test of mean 0 over seeds
(two-sided), and how many seeds are above 0. JSON: `benchmarks/results/seed_deltas_<name>.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from benchmarks.common import commit, save, stamp


def from_tables(paths: list[Path], method: str, metric: str) -> list[dict]:
    """Each seed of the `seeds_table` JSONs at `paths`: its data dirs and the metric in both."""
    rows = []
    for path in paths:
        table = json.loads(path.read_text())
        pairs = table.get("per_seed_vs_against", {})
        if method not in pairs:
            raise ValueError(f"{path}: field per_seed_vs_against has no method {method!r} (made without --against, "
                             f"or before seeds_table recorded it; methods: {sorted(pairs)})")
        for p in pairs[method]:
            rows.append({"seed": p["dir"], "change": p[metric], "base": p[f"{metric}_against"],
                         "source": str(path)})
    return rows


def summary(rows: list[dict]) -> dict:
    diffs = np.array([r["change"] - r["base"] for r in rows])
    out = {"seeds": len(rows), "mean_diff": float(diffs.mean()), "positive": int((diffs > 0).sum()),
           "per_seed": [{**r, "diff": float(d)} for r, d in zip(rows, diffs)]}
    if len(rows) >= 2:
        out["sd_diff"] = float(diffs.std(ddof=1))
        out["t_test_p"] = float(stats.ttest_1samp(diffs, 0.0).pvalue) if out["sd_diff"] > 0 else None
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--metric", default="recall@10", choices=("recall@10", "ndcg@10"))
    ap.add_argument("--json", nargs="*", type=Path, default=[])
    ap.add_argument("--record", nargs=3, action="append", default=[], metavar=("SEED", "CHANGE", "BASE"))
    ap.add_argument("--record-source", default="")
    a = ap.parse_args(argv)
    if a.record and not a.record_source:
        raise SystemExit("--record needs --record-source: where its figures come from")
    rows = from_tables(a.json, a.method, a.metric)
    rows += [{"seed": s, "change": float(c), "base": float(b), "source": a.record_source} for s, c, b in a.record]
    if not rows:
        raise SystemExit("no seeds: give --json or --record")
    out = summary(rows)
    print(f"{a.method} {a.metric}, change - base over {out['seeds']} seeds: mean {out['mean_diff']:+.4f}, "
          f"sd {out.get('sd_diff', 0):.4f}, t-test p {out.get('t_test_p')}, above 0 in {out['positive']}")
    save(f"seed_deltas_{a.name}", {**stamp({"method": a.method, "metric": a.metric}), "commit": commit(), **out})
    return out


if __name__ == "__main__":
    main()
