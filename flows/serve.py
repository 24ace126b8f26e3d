"""Scheduled retraining: serve the pipeline flow as a Prefect deployment with a cron schedule.

    make ui                                             # Prefect server + UI on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve [--cron "0 3 * * *"] [--dataset ml-100k] [--name NAME] [-S key=value ...]

Registers the deployment `pipeline/<name>` (default `retrain-<dataset>`) and stays up: at each
cron tick (UTC) it runs `flows.pipeline` with `data.dataset=<dataset>` and the -S overrides.
Ctrl-C stops serving and pauses the schedule. Runs show under Deployments and Runs in the UI.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from prefect.types.entrypoint import EntrypointType

from flows.pipeline import pipeline_flow
from tasks.params import load_params

DEFAULT_CRON = "0 3 * * *"


def serve_arguments(argv: Sequence[str] | None) -> dict[str, Any]:
    """Keyword arguments of `pipeline_flow.serve` from the command line; params are checked now,
    not at the first tick."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule, UTC (default {DEFAULT_CRON!r})")
    parser.add_argument("--dataset", default=None, help="data.dataset of each run (default: the one in params.yaml)")
    parser.add_argument("--name", default=None, help="deployment name (default: retrain-<dataset>)")
    parser.add_argument("-P", "--params", default=None, help="params file (default: params.yaml at the project root)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key in every run (repeatable)")
    args = parser.parse_args(argv)
    dataset = args.dataset or load_params(args.params).data.dataset
    overrides = [f"data.dataset={dataset}", *args.set]
    load_params(args.params, overrides)
    parameters: dict[str, Any] = {"overrides": overrides}
    if args.params:
        parameters["params_file"] = args.params
    return {"name": args.name or f"retrain-{dataset}", "cron": args.cron, "parameters": parameters,
            "tags": ["retrain", dataset], "description": f"The grc pipeline on {dataset}, on the schedule {args.cron}"}


def main(argv: Sequence[str] | None = None) -> None:
    from prefect.settings import PREFECT_API_URL

    kwargs = serve_arguments(argv)
    if not PREFECT_API_URL.value():
        sys.exit("flows.serve needs a running Prefect server: start one with `make ui`, then "
                 "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    # A module entrypoint: the runner imports flows.pipeline from the project root.
    pipeline_flow.serve(**kwargs, entrypoint_type=EntrypointType.MODULE_PATH)


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
