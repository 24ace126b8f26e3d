"""Stage `sasrec`: the SASRec baseline (full-softmax cross-entropy) on the same splits, and the
SASRec ensemble of `sasrec_ensemble.seeds` with its weight chosen on validation (tasks/sasrec.py).

    python -m flows.sasrec [-S data.dataset=scientific]
"""

from __future__ import annotations

import sys
from typing import Sequence

from prefect import flow, get_run_logger

from tasks import io
from tasks.cli import parse_cli
from tasks.params import Params
from tasks.sasrec import train_baseline


@flow(name="sasrec")
def sasrec_flow(params: Params) -> dict:
    result = {"dataset": params.data.dataset, **train_baseline(params)}
    io.write_json(params.reports_dir() / "sasrec.json", result)
    log = get_run_logger()
    log.info("SASRec: %d epochs, best validation %s", result["epochs_run"], result["best"])
    ensemble = result["ensemble"]
    for member in ensemble["members"]:
        log.info("ensemble member, seed %d: %d epochs, best validation %s", member["seed"], member["epochs_run"],
                 member["best"])
    if ensemble["choice"]:
        log.info("ensemble weight w %g chosen on %d validation users (recall@10 %s)", ensemble["weight"],
                 ensemble["choice"]["users"],
                 ", ".join(f"{r['weight']:g}: {r['recall@10']:.4f}" for r in ensemble["choice"]["valid"]))
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    return sasrec_flow(parse_cli(argv, __doc__))


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
