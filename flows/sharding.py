"""Run many calls of one Prefect task on Dask: the sharding engine of `candidates` and `mine`.

`shard_map(task, calls, workers, address, name)` runs `task(**call)` for every call as tasks of
one sub-flow whose task runner is prefect-dask's DaskTaskRunner: a local cluster of `workers`
single-threaded processes (`address` empty) or the running Dask scheduler at `address`. The
results come back in call order; in the Prefect UI the sub-flow shows one task run per shard.
"""

from __future__ import annotations

from typing import Any

from prefect import Task, flow, get_run_logger


def dask_runner(workers: int, address: str):
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@flow(name="shards")
def _shards(task: Task, calls: list[dict[str, Any]]) -> list[Any]:
    log = get_run_logger()
    futures = [task.submit(**call) for call in calls]
    out = []
    for k, future in enumerate(futures):
        out.append(future.result())
        log.info("shard %d of %d done", k + 1, len(futures))
    return out


def shard_map(task: Task, calls: list[dict[str, Any]], workers: int, address: str, name: str) -> list[Any]:
    if not calls:
        return []
    return _shards.with_options(name=name, task_runner=dask_runner(workers, address))(task, calls)
