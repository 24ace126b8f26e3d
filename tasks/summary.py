"""Print what the last `dvc repro` produced for the configured dataset (`make run` ends with this)."""

from __future__ import annotations

import json
import sys

from tasks.params import load_params
from tasks.ui import champion_entry


def main(argv: list[str]) -> None:
    params = load_params(None, argv)
    reports = params.reports_dir()
    ingest = reports / "ingest.json"
    if not ingest.exists():
        sys.exit(f"{ingest} not found: run `dvc repro` first")
    rec = json.loads(ingest.read_text())
    print(f"\n{rec['dataset']}: {rec['users']:,} users, {rec['items']:,} items, {rec['interactions']:,} interactions")
    print(f"  store:  {params.dataset_dir() / 'interactions.duckdb'}")
    print(f"  splits: {params.dataset_dir() / 'splits'} ({rec['split_rows']})")
    tok = reports / "tokenize.json"
    if tok.exists():
        t = json.loads(tok.read_text())
        print(f"  semantic IDs: {t.get('num_levels_total')} levels, {t.get('n_distinct_ids')} distinct for "
              f"{t.get('n_items')} items (plain tokenizer collisions {t.get('collision_rate_before'):.4f}, "
              f"after re-assignment {t.get('collision_rate_after_reassign'):.4f}), {params.dataset_dir() / 'tokenizer'}")
    metrics = reports / "metrics.json"
    if metrics.exists():
        methods = json.loads(metrics.read_text())["methods"]
        keys = sorted({k for m in methods.values() for k in m["metrics"]})
        print("\n  " + f"{'method':<10}" + "".join(f"{k:>12}" for k in keys))
        for name, m in methods.items():
            print("  " + f"{name:<10}" + "".join(f"{m['metrics'].get(k, float('nan')):>12.4f}" for k in keys))
        board = json.loads(metrics.read_text()).get("leaderboard")
        if board:
            margin = board.get("margin", {}).get("recall@10")
            print(f"\n  champion on {board['users']:,} validation users: {board['champion']} "
                  f"(valid recall@10 {champion_entry(board)['metrics']['recall@10']:.4f}"
                  + (f", {margin['diff']:+.4f} over {board['runner_up']}, p = {margin['p_value']:.3f}" if margin else "")
                  + ")")
        print(f"  per-user ranks: {params.dataset_dir() / 'eval'}")
        print(f"  run report:     {reports / 'report.md'}")
    cand = reports / "candidates.json"
    if cand.exists():
        c = json.loads(cand.read_text())
        print(f"\n  candidate dump: {params.dataset_dir() / 'candidates'} ({c['users']:,} users x top {c['top_n']} "
              f"from {c['method']}, {c['shards']} Parquet shards, manifest.json)")


if __name__ == "__main__":
    main(sys.argv[1:])
