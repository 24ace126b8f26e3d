"""One stage as a deployment run on a work pool: pull its inputs, run it, push its outputs.

    prefect deploy --all                     # prefect.yaml: run-stage/<stage> on the stage's pool
    prefect worker start --pool gpu --limit 1   # in a checkout; the pipeline starts the runs:
    python -m flows.pipeline -S pipeline.executor=deployments

The pipeline (flows/pipeline.py) starts `run-stage/<stage>` with its params (the whole params
mapping, after its -S overrides), the DVC lock entries of the stages run so far and the stage's
code digest. On the worker, in the checkout it was started in, this flow
1. refuses to run other code than the pipeline's (the digest of the stage's import closure),
2. runs under the pipeline's params: params.yaml holds them while the stage runs, with every device
   key of the stage set to the pool's `GRC_DEVICE`, so `dvc.lock` records what was run; the file is
   put back afterwards,
3. pulls the stage's inputs from the DVC remote (tasks/dvc_remote.py), runs the stage's own flow as
   a sub-flow, commits and pushes its outputs,
4. publishes the stage's lock entry and result as the artifact `dvc-lock-<stage>`, which the
   pipeline reads (`run_on_pool`).
One stage runs at a time per checkout (a lock file; further runs wait).
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
from contextlib import contextmanager
from typing import Any, Iterator

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks import dvc_remote
from tasks.deployments import DEVICE_ENV, device_overrides
from tasks.env import PROJECT_ROOT
from tasks.io import write_bytes, write_text
from tasks.params import apply_override, load_params
from tasks.stages import STAGES, code_digest

PARAMS_FILE = PROJECT_ROOT / "params.yaml"
POLL_S = 2  # how often the pipeline asks whether a stage run has ended
FENCE = "```json"


@contextmanager
def one_stage_at_a_time() -> Iterator[None]:
    path = PROJECT_ROOT / ".dvc" / "tmp" / "run-stage.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def params_in_place(raw: dict[str, Any]) -> Iterator[None]:
    """params.yaml holds `raw` inside the block (DVC reads params from it), then its own bytes again."""
    original = PARAMS_FILE.read_bytes()
    if yaml.safe_load(original) == raw:
        yield
        return
    write_text(PARAMS_FILE, yaml.safe_dump(raw, sort_keys=False))
    try:
        yield
    finally:
        write_bytes(PARAMS_FILE, original)


def lock_artifact_key(stage: str) -> str:
    return "dvc-lock-" + stage.replace("_", "-")  # artifact keys: lowercase letters, digits, dashes


def lock_markdown(stage: str, record: dict[str, Any]) -> str:
    """The artifact text: the outputs as a table, then `record` (lock entry, result, transfer costs) as JSON."""
    outs = "\n".join(f"| `{o['path']}` | {o.get('md5', '')} | {o.get('size', '')} |"
                     for o in record["lock"].get("outs", []))
    return (f"Outputs of `{stage}`, pushed to the DVC remote (the next stages pull them):\n\n"
            f"| path | md5 | bytes |\n|---|---|---|\n{outs}\n\nIts `dvc.lock` entry, result and transfers:\n\n"
            f"{FENCE}\n{json.dumps(record, indent=1, default=str)}\n```\n")


def record_from_markdown(text: str) -> dict:
    """The record `lock_markdown` wrote: "lock" (the stage's dvc.lock entry), "result" (what its flow
    returned), "pull" and "push" (what moved, bytes, seconds)."""
    return json.loads(text.split(FENCE + "\n", 1)[1].rsplit("```", 1)[0])


@flow(name="run-stage")
def run_stage_flow(stage: str, params: dict[str, Any] | None = None, upstream: dict[str, dict] | None = None,
                   code: str = "") -> dict[str, Any]:
    """`params`: the params mapping (None: this checkout's params.yaml); `upstream`: dvc.lock entries
    of stages already run; `code`: the pipeline's code digest of the stage ("": not checked)."""
    log = get_run_logger()
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; tasks/stages.py declares {list(STAGES)}")
    if code and code != code_digest(stage):
        raise ValueError(f"{stage}: the checkout {PROJECT_ROOT} has other code for this stage than the pipeline "
                         "that started it: check out the pipeline's commit on this worker")
    raw = copy.deepcopy(params) if params is not None else yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))
    device = os.environ.get(DEVICE_ENV, "")
    for text in device_overrides(raw, stage, device):
        apply_override(raw, text)
    with one_stage_at_a_time(), params_in_place(raw):
        run_params = load_params(PARAMS_FILE)
        dvc_remote.merge_lock(upstream or {})
        pulled = dvc_remote.pull_inputs(run_params, stage)
        log.info("%s in %s%s: pulled %d inputs (%.1f MB) in %.1f s", stage, PROJECT_ROOT,
                 f" on {device}" if device else "", len(pulled["targets"]), pulled["bytes"] / 1e6, pulled["seconds"])
        stage_flow = STAGES[stage].flow()
        result = stage_flow(run_params)
        pushed = dvc_remote.push_outputs(run_params, stage)
    log.info("%s: pushed %d files (%.1f MB) in %.1f s after a %.1f s commit", stage, pushed["files_pushed"],
             pushed["bytes"] / 1e6, pushed["push_seconds"], pushed["commit_seconds"])
    record = {"lock": pushed.pop("lock"), "result": result, "pull": pulled, "push": pushed,
              "checkout": str(PROJECT_ROOT), "device": device}
    create_markdown_artifact(markdown=lock_markdown(stage, record), key=lock_artifact_key(stage),
                             description=f"DVC outputs of {stage}")
    return record


def run_on_pool(stage: str, raw: dict[str, Any], upstream: dict[str, dict]) -> dict[str, Any]:
    """Run `run-stage/<stage>` as a child of the calling flow run, wait for it, and return the stage's
    record (`record_from_markdown`); a child that does not complete fails the caller with its message."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.deployments import run_deployment

    from tasks.deployments import deployment_name, pool_of

    get_run_logger().info("%s: waiting for a worker of pool %s", stage, pool_of(stage))
    child = run_deployment(deployment_name(stage), parameters={"stage": stage, "params": raw, "upstream": upstream,
                                                               "code": code_digest(stage)},
                           timeout=None, poll_interval=POLL_S)
    if not child.state.is_completed():
        raise RuntimeError(f"{stage} (run {child.name} on pool {pool_of(stage)}) ended {child.state.type.value}: "
                           f"{child.state.message}")
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[child.id]), key=ArtifactFilterKey(any_=[lock_artifact_key(stage)])))
    record = record_from_markdown(artifact.data)
    get_run_logger().info("%s ran on pool %s in %s: pulled %.1f MB in %.1f s, pushed %.1f MB in %.1f s", stage,
                          pool_of(stage), record["checkout"], record["pull"]["bytes"] / 1e6, record["pull"]["seconds"],
                          record["push"]["bytes"] / 1e6, record["push"]["push_seconds"] + record["push"]["commit_seconds"])
    return record
