"""Print what the last `dvc repro` produced for the configured dataset (`make run` ends with this)."""

from __future__ import annotations

import json
import sys

from tasks.params import load_params


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
        print(f"  semantic IDs: {t.get('num_levels_total')} levels, collisions before disambiguation "
              f"{t.get('collision_rate_before'):.4f}, table {params.dataset_dir() / 'tokenizer'}")


if __name__ == "__main__":
    main(sys.argv[1:])
