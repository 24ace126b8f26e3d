"""Stage `mine`: reflection labels (r_loc, r_sem) for backbone drafts of training and validation instances.

    python -m flows.mine [-S data.dataset=scientific] [-S mine.beam=50]
    python -m flows.mine -S mine.workers=4 [-S mine.dask_address=tcp://scheduler:8786]   # beam searches on Dask

Writes `data/<dataset>/mine/{train,valid}.parquet` and `reports/<dataset>/mine.json` (label
distributions on training vs validation instances, and the cost).
"""

from __future__ import annotations

import sys
from typing import Sequence

from prefect import flow, get_run_logger

from flows.sharding import shard_map
from tasks import io
from tasks.cli import parse_cli
from tasks.mine import mine_labels
from tasks.params import Params


@flow(name="mine")
def mine_flow(params: Params) -> dict:
    log = get_run_logger()
    mn = params.mine
    sharded = mn.workers > 1 or bool(mn.dask_address)
    map_chunks = ((lambda task, calls: shard_map(task, calls, mn.workers, mn.dask_address, "mine-shards"))
                  if sharded else None)
    report = {"dataset": params.data.dataset, **mine_labels(params, map_chunks), "workers": mn.workers}
    io.write_json(params.reports_dir() / "mine.json", report)
    for split in ("train", "valid"):
        share = report[split]["r_loc_share"]
        log.info("%s r_loc shares %s", split, " ".join(f"{k}:{v:.3f}" for k, v in share.items()))
    log.info("r_loc total variation train vs valid: %.3f", report["r_loc_total_variation"])
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    return mine_flow(parse_cli(argv, __doc__))


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
