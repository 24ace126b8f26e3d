"""The whole pipeline as one Prefect flow; each stage runs as a sub-flow (a child run in the UI).

    python -m flows.pipeline [-P params.yaml] [-S data.dataset=scientific] [-S key=value ...]

ingest -> embed (skipped where the dataset has prebuilt semantic IDs) -> sasrec -> tokenize ->
backbone -> mine -> sft -> grpo -> vstar -> evaluate -> candidates (tasks/stages.py declares them
and their inputs; this order follows). Unlike `dvc repro` it skips no stage
whose inputs are unchanged: stages that resume (training from `ckpt/last`, candidate shards,
the ingest of an unchanged source, cached embeddings) are quick, the others run again.
`flows/serve.py` serves this flow on a cron schedule.

`pipeline.executor: deployments` runs each stage instead as a run of the deployment
`run-stage/<stage>` on its work pool (prefect.yaml, flows/run_stage.py), one at a time, each after
the stages that make its declared inputs (the same order); outputs travel through the DVC remote, and this
checkout's dvc.lock records every stage's outputs.
"""

from __future__ import annotations

import sys
from typing import Sequence

from prefect import flow, get_run_logger, tags

from flows.run_stage import run_on_pool
from tasks.cli import parse_args, run_main
from tasks.deployments import dependency_order
from tasks.dvc_remote import merge_lock
from tasks.params import ParamsError, load_params
from tasks.stages import STAGES as DECLARED
from tasks.ui import run_name

# The stages declared in tasks/stages.py, each after the stages that make its inputs (sasrec before
# tokenize, which reads SASRec's item table for collaborative IDs), with its flow (`Stage.flow`).
STAGES = tuple((name, DECLARED[name].flow()) for name in dependency_order(list(DECLARED)))


def pipeline_run_name() -> str:
    """`pipeline-<dataset>-<params hash>` (tasks/ui.py), from this run's parameters."""
    from prefect.runtime import flow_run

    args = flow_run.parameters
    try:
        params = load_params(args.get("params_file"), args.get("overrides") or [])
    except ParamsError:  # the flow body raises it again, so the run fails with its message
        return "pipeline-invalid-params"
    return run_name("pipeline", params)


# Plain JSON parameters, not a Params object: a deployment's runs get their parameters from the API.
@flow(name="pipeline", flow_run_name=pipeline_run_name)
def pipeline_flow(overrides: list[str] | None = None, params_file: str | None = None) -> dict[str, dict]:
    log = get_run_logger()
    params = load_params(params_file, overrides or [])
    results: dict[str, dict] = {}
    on_pools = params.pipeline.executor == "deployments"
    locks: dict[str, dict] = {}  # on pools: the dvc.lock entry of each stage run, handed to the next ones
    for name, stage in STAGES:
        # on pools embed runs anyway: its (empty) table is a DVC dep of tokenize, which the worker commits
        if name == "embed" and params.id_source == "prebuilt" and not on_pools:
            log.info("embed: skipped, %s has prebuilt semantic IDs", params.data.dataset)
            continue
        if on_pools:
            record = run_on_pool(name, params.raw, locks)
            locks[name], results[name] = record["lock"], record["result"]
            merge_lock({name: record["lock"]})  # this checkout's dvc.lock: `dvc pull` fetches the run's outputs
        else:
            # Each stage a child run named like this one and tagged with its stage and dataset.
            with tags("stage", name, params.data.dataset):
                results[name] = stage.with_options(flow_run_name=run_name(name, params))(params)
    log.info("%s: ran %s", params.data.dataset, " -> ".join(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv, __doc__)
    load_params(args.params, args.set)  # a typo fails here, before any flow run starts
    return pipeline_flow(overrides=list(args.set), params_file=args.params)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
