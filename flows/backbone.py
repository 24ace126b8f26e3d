"""Stage `backbone`: train the TIGER-style encoder-decoder on every training prefix.

    python -m flows.backbone [-S data.dataset=instruments] [-S backbone.train.epochs=50]

Resumes from `data/<dataset>/backbone/ckpt/last` when a previous run was interrupted.
"""

from __future__ import annotations

import sys
from typing import Sequence

from prefect import flow, get_run_logger

from tasks import io
from tasks.backbone import train_backbone
from tasks.cli import parse_cli
from tasks.params import Params


@flow(name="backbone")
def backbone_flow(params: Params) -> dict:
    log = get_run_logger()
    result = {"dataset": params.data.dataset, **train_backbone(params)}
    io.write_json(params.reports_dir() / "backbone.json", result)
    log.info("best validation Recall@10 %.4f at epoch %d; %.0f samples/s, %.1f GFLOP/s",
             result["best_valid_recall@10"], result["best_epoch"], result["samples_per_s"], result["gflops_per_s"])
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    return backbone_flow(parse_cli(argv, __doc__))


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
