"""Stage outputs through the DVC remote, for a stage run on a work pool (flows/run_stage.py).

A worker's checkout holds only what its own stages made. Before a stage runs, `pull_inputs`
fetches the input artifacts it declares (tasks/stages.py) from the remote, as the DVC lock entries
of the stages that made them say (`dvc pull <path>`, granular: evaluate fetches
`backbone/model.safetensors`, not the backbone's checkpoints); after it succeeds, `push_outputs`
records its outputs in `dvc.lock` (`dvc commit <stage>`) and uploads them (`dvc push <stage>`).
The lock entry travels back to the pipeline run, which hands it to the next stages: the workers
share the remote and the Prefect API, no disk and no git push.

The remote is the default remote of `.dvc/config`; `dvc remote modify --local storage url
s3://bucket/grc` (with the `dvc-s3` package) points one checkout elsewhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from prefect import task

from tasks.env import PROJECT_ROOT
from tasks.io import write_text
from tasks.params import Params
from tasks.deployments import producer
from tasks.stages import STAGES

LOCK = PROJECT_ROOT / "dvc.lock"


def _repo():
    from dvc.repo import Repo  # imported here: a stage run in process never loads DVC

    return Repo(str(PROJECT_ROOT))


def read_lock() -> dict[str, dict]:
    """The stage entries of this checkout's dvc.lock (none where it has no lock yet)."""
    if not LOCK.exists():
        return {}
    return (yaml.safe_load(LOCK.read_text(encoding="utf-8")) or {}).get("stages", {})


def merge_lock(entries: dict[str, dict]) -> None:
    """Put the given stages' lock entries into this checkout's dvc.lock, keeping the others."""
    if not entries:
        return
    stages = {**read_lock(), **entries}
    ordered = {name: stages[name] for name in (*STAGES, *stages) if name in stages}  # dvc.yaml's order
    write_text(LOCK, yaml.safe_dump({"schema": "2.0", "stages": ordered}, sort_keys=False))


def _repo_relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        raise ValueError(f"{path} is outside the checkout {PROJECT_ROOT}: DVC tracks only paths inside it; "
                         "keep data.data_dir relative") from None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@task(name="dvc-pull-inputs")
def pull_inputs(params: Params, stage: str) -> dict[str, Any]:
    """`dvc pull` each declared input of `stage` that a stage in dvc.lock made; returns what and how long."""
    locked = read_lock()
    targets = [_repo_relative(params.dataset_dir() / rel) for rel in STAGES[stage].inputs
               if producer(rel) in locked]
    start = time.perf_counter()
    if targets:
        with _repo() as repo:
            repo.pull(targets=targets)
    return {"targets": targets, "bytes": sum(_size(PROJECT_ROOT / t) for t in targets),
            "seconds": round(time.perf_counter() - start, 2)}


@task(name="dvc-push-outputs")
def push_outputs(params: Params, stage: str) -> dict[str, Any]:
    """`dvc commit <stage>` then `dvc push <stage>`; returns the stage's lock entry and the cost."""
    start = time.perf_counter()
    with _repo() as repo:
        repo.commit(stage, force=True)
        committed = time.perf_counter()
        pushed = repo.push(targets=[stage])
    entry = read_lock()[stage]
    cached = {_repo_relative(params.dataset_dir() / o.path) for o in STAGES[stage].outs if o.cache}
    size = sum(int(o.get("size", 0)) for o in entry.get("outs", []) if o["path"] in cached)
    return {"lock": entry, "files_pushed": pushed, "bytes": size,
            "commit_seconds": round(committed - start, 2), "push_seconds": round(time.perf_counter() - committed, 2)}
