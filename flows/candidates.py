"""Stage `candidates`: top-N items with scores of one method for every test user, as Parquet shards.

    python -m flows.candidates [-S candidates.method=tiger] [-S candidates.top_n=100] [-S candidates.users_file=ids.txt]

Writes `data/<dataset>/candidates/part-*.parquet` (user_id, rank, item_id, score), a sidecar per
shard, and `manifest.json` last; `reports/<dataset>/candidates.json` (DVC metrics). A killed run
resumes: shards whose sidecar matches this run are kept (tasks/candidates.py).

    python -m flows.candidates -S candidates.workers=4                       # local Dask cluster
    python -m flows.candidates -S candidates.dask_address=tcp://sched:8786   # an existing one

shard the decode across Dask workers (a `shards` sub-flow with prefect-dask's task runner).

The finished dump is then published behind the promotion gate (tasks/publish.py): copied with its
model into `data/<dataset>/published/<version>/` and `published/current` switched to it, unless
its method's validation recall@10 is below the published model's on the same users by more than
`candidates.promotion_tolerance`; then the old dump stays and the flow run ends Refused.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from prefect import flow, get_run_logger
from prefect.states import Failed

from tasks import io
from flows.sharding import shard_map
from grc_core.device import set_threads
from tasks.candidates import (current_shard, dump_ranker, dump_shard, gate_shard, plan_dump, rank_shard,
                              remove_stale_shards, start_dump, write_manifest, write_shard)
from tasks.cli import parse_cli
from tasks.params import Params
from tasks.publish import (CURRENT, PromotionRefused, append_publication, current_dump, promotion_decision,
                           publish_dump, published_root, record_decision)
from tasks.ui import publish_promotion


@flow(name="candidates")
def candidates_flow(params: Params) -> dict:
    log = get_run_logger()
    t0 = time.perf_counter()
    plan = plan_dump(params)
    start_dump(plan.out_dir)
    records: dict[str, dict] = {}
    todo = []
    for shard in plan.shards:
        record = current_shard(plan.out_dir, shard, plan.fingerprint)
        if record is not None:
            records[shard.name] = record
            log.info("%s: %d users, kept from an earlier run", shard.name, len(shard.users))
        else:
            todo.append(shard)
    reused = len(records)
    cd = params.candidates
    if todo and (cd.workers > 1 or cd.dask_address):
        done = shard_map(dump_shard, [{"params": params, "plan": plan, "shard": s} for s in todo],
                         cd.workers, cd.dask_address, "candidates-shards")
        records.update({s.name: r for s, r in zip(todo, done)})
    else:
        set_threads(cd.threads)
        ranker = dump_ranker(params, plan) if todo else None
        for shard in todo:
            frame = rank_shard(ranker, shard, plan.top_n)
            # The gate runs before the shard is written: a bad shard never reaches the folder.
            gate_shard(frame, len(shard.users), plan.top_n, plan.n_items, params.reports_dir(),
                       suite=f"candidates_{shard.name}")
            records[shard.name] = write_shard(plan.out_dir, shard, frame, plan.fingerprint)
            log.info("%s: %d users written", shard.name, len(shard.users))
    records = [records[s.name] for s in plan.shards]
    stale = remove_stale_shards(plan.out_dir, {s.name for s in plan.shards})
    manifest = write_manifest(plan, records)
    decision, published = promote(params, manifest)
    wall = time.perf_counter() - t0
    report = {"dataset": plan.dataset, "method": plan.method, "chosen_by": plan.chosen_by, "top_n": plan.top_n,
              "users": manifest["users"],
              "rows": manifest["rows"], "shards": len(records), "shards_reused": reused,
              "workers": cd.workers, "dask_address": cd.dask_address,
              "users_per_s_decoded": round(sum(len(s.users) for s in todo) / max(wall, 1e-9), 2),
              "stale_removed": len(stale), "wall_s": round(wall, 1),
              "promoted": decision["promoted"], "promotion_reason": decision["reason"],
              "published": str(published) if published else None}
    io.write_json(params.reports_dir() / "candidates.json", report)
    log.info("%s: %d users x top %d from %s in %d shards (%d kept from an earlier run), %.1f s",
             plan.dataset, report["users"], plan.top_n, plan.method, len(records), reused, wall)
    if not decision["promoted"]:
        log.warning("not published: %s", decision["reason"])
        # A named Failed state: the UI shows "Refused" with the reason; a parent flow run fails with it.
        return Failed(name="Refused", message=f"promotion refused: {decision['reason']}",
                      data=PromotionRefused(f"promotion refused: {decision['reason']}"))
    log.info("published as %s: %s", published, decision["reason"])
    return report


def promote(params: Params, manifest: dict) -> tuple[dict, Path | None]:
    """The promotion gate (tasks/publish.py): publish the finished dump as a new version and
    point `current` at it, or keep the published one; either way the decision is recorded, shown
    in the UI and added to the run report."""
    root = published_root(params)
    decision = promotion_decision(params, manifest["method"], current_dump(root))
    published = publish_dump(params, manifest, decision) if decision["promoted"] else None
    record_decision(root, {**decision, "version": published.name if published else None})
    append_publication(params.reports_dir() / "report.md", decision, published)
    publish_promotion(params.data.dataset, decision, root / CURRENT if published else None)
    return decision, published


def main(argv: Sequence[str] | None = None) -> dict:
    """A refused promotion is a result here, not an error: the dump is built, the published one
    stays, and `dvc repro` goes on (the flow run is marked Refused; a pipeline run fails with it)."""
    params = parse_cli(argv, __doc__)
    try:
        return candidates_flow(params)
    except PromotionRefused as refused:
        print(f"candidates: {refused}; {published_root(params) / CURRENT} is unchanged")
        return io.read_json(params.reports_dir() / "candidates.json")


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
