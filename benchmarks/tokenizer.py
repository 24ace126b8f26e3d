"""Embed + tokenize cost and ID quality on one dataset, from an empty cache, in a scratch data dir.

    python -m benchmarks.tokenizer --dataset scientific [-S tokenize.method=rkmeans ...]

Runs the real flows (ingest, embed, tokenize) as subprocesses; the wall times include
Prefect's start (about 15 s a flow). Writes benchmarks/results/tokenizer_<dataset>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import run_flow, save, stamp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="scientific")
    ap.add_argument("--tag", default="")
    ap.add_argument("-S", "--set", action="append", default=[])
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="grc-bench-"))
    try:
        base = [f"data.dataset={args.dataset}", f"data.data_dir={scratch / 'data'}",
                f"data.reports_dir={scratch / 'reports'}", *args.set]
        times = {stage: round(run_flow(stage, base), 1) for stage in ("ingest", "embed", "tokenize")}
        reports = scratch / "reports" / args.dataset
        embed = json.loads((reports / "embed.json").read_text())
        tok = json.loads((reports / "tokenize.json").read_text())
        tok.pop("gate", None)
        payload = {**stamp({"dataset": args.dataset, "overrides": args.set}),
                   "wall_s": {**times, "embed_plus_tokenize": round(times["embed"] + times["tokenize"], 1)},
                   "compute_s": {"embed": embed["wall_s"], "tokenize": tok["wall_s"]},
                   "embed": embed, "tokenize": tok}
        save(f"tokenizer_{args.dataset}{'_' + args.tag if args.tag else ''}", payload)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
