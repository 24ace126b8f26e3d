"""Stage `ingest`: source files -> DuckDB store -> gated leave-one-out splits (Parquet).

    python -m flows.ingest [-S data.dataset=scientific]

LC-Rec and RecBole sources go through polars in memory; `format: parquet` sources stream
through DuckDB with bounded memory (`ingest_parquet`, tasks/ingest.py); a Parquet log that only
gained partitions since the last ingest is appended, keeping every stored id.

One ingest of a dataset runs at a time (a second fails at once, naming the first); the store
and the files it writes (items.parquet, splits/) change together: the files are staged, the
store names their version in its transaction, then they are moved in (docs/DESIGN.md, "Data").
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from prefect import flow, get_run_logger

from tasks import io, store
from tasks.cli import parse_cli
from tasks.ingest import (build_splits, commit_and_publish, drop_short_users, fault, fetch_source, gate_raw,
                          gate_splits, ingest_lock, ingest_parquet, read_source, recover, source_hash, stage_tables,
                          with_buckets)
from tasks.params import Params
from tasks.ui import publish_gates


@flow(name="ingest")
def ingest_flow(params: Params) -> dict:
    out_dir = params.dataset_dir()
    with ingest_lock(out_dir, params.data.dataset):
        recover(out_dir, out_dir / "interactions.duckdb")
        fault("locked")
        return ingest(params)


def ingest(params: Params) -> dict:
    log = get_run_logger()
    spec, out_dir, report_dir = params.dataset, params.dataset_dir(), params.reports_dir()
    db_path = out_dir / "interactions.duckdb"
    fetch_source(spec)
    src_hash = source_hash(spec, params)
    if spec.format == "parquet":
        streamed = ingest_parquet(spec, params, db_path, out_dir, report_dir, src_hash)
        appended = streamed["appended"] or {}
        if appended.get("duplicates_skipped"):
            log.info("skipped %d file(s) whose bytes were ingested before: %s", len(appended["duplicates_skipped"]),
                     ", ".join(appended["duplicates_skipped"]))
        if streamed["mode"] == "append":
            log.info("appended %d new partition file(s) to the store; stored ids and positions are unchanged",
                     len(appended["files"]))
        elif not streamed["changed"]:
            log.info("source unchanged since the last ingest: only the splits were rebuilt from the store")
        result = {"dataset": params.data.dataset, **store.counts(db_path), "changed": streamed["changed"],
                  "mode": streamed["mode"], "appended": streamed["appended"],
                  "split_rows": streamed["split_rows"], "source_hash": src_hash, "gates": streamed["gates"]}
        return finish(result, report_dir)
    if db_path.exists() and store.latest_source_hash(db_path) == src_hash:
        log.info("source unchanged since the last ingest: the store is left as it is")
        items, interactions, changed = store.read_table(db_path, "items"), store.read_table(db_path, "interactions"), False
    else:
        raw = read_source(spec)
        interactions = raw.interactions
        if params.data.drop_short_users:
            interactions = drop_short_users(interactions, params.data.min_sequence_length)
        items, changed = with_buckets(raw.items), True
    splits = build_splits(interactions, params.data.max_history)
    n_users = interactions["user_id"].n_unique()
    # Every gate runs before anything is written, so a failure leaves the store as it was.
    gates = gate_raw(items, interactions, params, report_dir)
    gates += gate_splits(splits, items.height, n_users, params.data.max_history, report_dir)
    version = stage_tables(out_dir, items, splits)
    if changed:
        commit_and_publish(out_dir, db_path, version, items, interactions, src_hash, raw.source_files)
    else:
        commit_and_publish(out_dir, db_path, version)
    rows = {name: frame.height for name, frame in splits.items()}
    result = {"dataset": params.data.dataset, **store.counts(db_path), "changed": changed,
              "split_rows": rows, "source_hash": src_hash, "gates": gates}
    return finish(result, report_dir)


def finish(result: dict, report_dir: Path) -> dict:
    io.write_json(report_dir / "ingest.json", result)
    publish_gates(result["dataset"], result["gates"], "ingest")
    get_run_logger().info("%s: %d users, %d items, %d interactions", result["dataset"],
                          result["users"], result["items"], result["interactions"])
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    params = parse_cli(argv, __doc__)
    result = ingest_flow(params)
    print(f"{result['dataset']}: {result['users']:,} users, {result['items']:,} items, "
          f"{result['interactions']:,} interactions (read back from the DuckDB store)")
    return result


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
