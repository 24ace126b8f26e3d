"""The pipeline on two work pools against the in-process pipeline, on one dataset (issue 19).

    python -m benchmarks.work_pools --work /tmp/wp [-S key=value ...] [--device cpu]

Four clones of this repository at HEAD under `--work` (commit first: uncommitted changes are not
in them), sharing no data folder: `inprocess` runs `python -m flows.pipeline` (every stage in
one process after another), then `starter` deploys prefect.yaml and runs the same pipeline with
`pipeline.executor=deployments` while a process worker of the pool `cpu` runs in the clone `cpu`
and one of the pool `gpu` in the clone `gpu`; stage outputs travel through a local DVC remote
directory (`<work>/remote`, set in each clone's .dvc/config.local). One local Prefect server,
this environment's venv for every clone. The two runs go one after the other, so each has the
machine to itself. `--device cpu` rewrites the gpu pool's job variables (GRC_DEVICE) for a
machine without CUDA; `--query-seconds` is how often the workers poll (Prefect's default 10).
The dataset's source folder is passed by absolute path (`datasets.<ds>.path`),
since the clones hold no data.

Writes benchmarks/results/work_pools_<dataset>.json: both wall times, each stage's duration in
both runs (from the Prefect API: the in-process run's sub-flow runs, the pooled run's deployment
runs), the pooled stages' DVC pull and push (files, bytes, seconds, from their `dvc-lock-<stage>`
artifacts), and whether the pooled run's outputs, `dvc pull`ed into the starter, equal the
in-process run's byte for byte (Parquet and safetensors files; checkpoints left out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import pool_workers, prefect_server, save, stamp
from tasks.env import PROJECT_ROOT
from tasks.params import apply_override, load_params, resolve_path

VENV_BIN = Path(sys.executable).parent
POOLS = ("cpu", "gpu")


def clone(dst: Path, remote: Path) -> Path:
    if not dst.exists():
        subprocess.run(["git", "clone", "-q", str(PROJECT_ROOT), str(dst)], check=True)
    (dst / ".dvc" / "config.local").write_text(f"['remote \"storage\"']\n    url = {remote}\n")
    return dst


def output_hashes(root: Path, dataset: str) -> dict[str, str]:
    out = root / "data" / dataset
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.suffix in (".parquet", ".safetensors") and "ckpt" not in p.parts and "published" not in p.parts
            and p.name != "embeddings_cache.parquet"}


def stage_runs(url: str, parent_name: str) -> dict[str, dict]:
    """The stage runs under the pipeline run named `parent_name`: duration and state per stage."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey,
                                                FlowRunFilter, FlowRunFilterName)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.run_stage import lock_artifact_key, record_from_markdown

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        [parent] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[parent_name])))
        runs = [r for r in client.read_flow_runs() if r.parent_task_run_id is not None
                and client.read_task_run(r.parent_task_run_id).flow_run_id == parent.id]
        out: dict[str, dict] = {}
        for r in runs:
            stage = r.parameters.get("stage") or client.read_flow(r.flow_id).name
            entry = {"seconds": round(r.total_run_time.total_seconds(), 1), "state": r.state.type.value,
                     "pool": r.work_pool_name}
            if r.deployment_id is not None:
                [art] = client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[r.id]), key=ArtifactFilterKey(any_=[lock_artifact_key(stage)])))
                record = record_from_markdown(art.data)
                entry["pull"] = {k: record["pull"][k] for k in ("bytes", "seconds")} | {"files": len(record["pull"]["targets"])}
                entry["push"] = {k: v for k, v in record["push"].items() if k != "lock"}
            out[stage] = entry
    return {"parent": {"seconds": round(parent.total_run_time.total_seconds(), 1), "state": parent.state.type.value},
            "stages": out}


def run_pipeline(root: Path, env: dict, overrides: list[str], log: Path) -> tuple[float, str]:
    """`python -m flows.pipeline -S ...` in `root`; its wall time and its run's name (from the log)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([str(VENV_BIN / "python"), "-m", "flows.pipeline", *[a for o in overrides for a in ("-S", o)]],
                              cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"{root.name}: the pipeline failed (exit {done.returncode}); log {log}:\n{text[-3000:]}")
    name = next(line.split("Flow run '")[1].split("'")[0] for line in text.splitlines()
                if "Beginning flow run" in line and "for flow 'pipeline'" in line)
    return wall, name


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--device", default="", help="the gpu pool's GRC_DEVICE (default: prefect.yaml's)")
    ap.add_argument("--query-seconds", type=float, default=10.0,
                    help="how often a worker polls for runs (PREFECT_WORKER_QUERY_SECONDS; Prefect's default 10)")
    args = ap.parse_args(argv)
    params = load_params(overrides=args.set)
    ds = params.data.dataset
    source = resolve_path(params.dataset.path)
    overrides = [*args.set, f"datasets.{ds}.path={json.dumps(str(source))}"]
    work, remote = args.work.resolve(), args.work.resolve() / "remote"
    work.mkdir(parents=True, exist_ok=True)
    roots = {name: clone(work / name, remote) for name in ("inprocess", "starter", *POOLS)}
    if args.device:
        text = (roots["starter"] / "prefect.yaml").read_text()
        (roots["starter"] / "prefect.yaml").write_text(text.replace("GRC_DEVICE: cuda", f"GRC_DEVICE: {args.device}"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=roots["starter"], capture_output=True,
                            text=True, check=True).stdout.strip()
    report = {**stamp({"overrides": overrides, "device": args.device, "work": str(work),
                        "worker_query_seconds": args.query_seconds}), "dataset": ds,
              "commit": commit, "params_hash": load_params(overrides=overrides).section_hash()}
    with prefect_server(work / "prefect-home") as server:
        env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PREFECT_API_URL": server["url"],
               "PREFECT_HOME": str(server["home"])}
        wall, name = run_pipeline(roots["inprocess"], env, overrides, work / "inprocess.log")
        report["inprocess"] = {"wall_s": round(wall, 1), "run": name, **stage_runs(server["url"], name)}
        print(f"in-process: {wall:.0f} s", flush=True)

        with pool_workers(server["url"], {p: roots[p] for p in POOLS}, env, work, args.query_seconds):
            deploy = subprocess.run([str(VENV_BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=roots["starter"],
                                    env=env, capture_output=True, text=True)
            if deploy.returncode != 0:
                raise SystemExit(f"prefect deploy failed:\n{deploy.stdout[-3000:]}{deploy.stderr[-3000:]}")
            wall, name = run_pipeline(roots["starter"], env, [*overrides, "pipeline.executor=deployments"],
                                      work / "pools.log")
        report["pools"] = {"wall_s": round(wall, 1), "run": name, **stage_runs(server["url"], name)}
        print(f"two pools: {wall:.0f} s", flush=True)
    # dvc.yaml's paths come from params.yaml: the starter's must hold the run's overrides (a worker's
    # stage does the same, flows/run_stage.params_in_place) for `dvc pull` to find the run's outputs
    raw = yaml.safe_load((roots["starter"] / "params.yaml").read_text())
    for text in overrides:
        apply_override(raw, text)
    (roots["starter"] / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    t0 = time.perf_counter()
    pull = subprocess.run([str(VENV_BIN / "dvc"), "pull", "-q"], cwd=roots["starter"], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
    report["starter_pull"] = {"seconds": round(time.perf_counter() - t0, 1), "returncode": pull.returncode}
    got, want = output_hashes(roots["starter"], ds), output_hashes(roots["inprocess"], ds)
    report["outputs"] = {"files": len(want), "equal": got == want,
                         "differing": sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))}
    report["remote_bytes"] = sum(p.stat().st_size for p in remote.rglob("*") if p.is_file())
    save(f"work_pools_{ds}", report)
    return report


if __name__ == "__main__":
    main()
