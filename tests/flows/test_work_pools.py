"""The pipeline on two work pools: two process workers in two checkouts that share no disk but a
DVC remote directory, against a real Prefect server, give the in-process run's results.

Three copies of the tiny project: `starter` deploys prefect.yaml and runs the pipeline with
`pipeline.executor=deployments`; `cpu` and `gpu` each run a worker of that pool. Only the source
dataset (the ingest's input, named by params) and the remote are outside the checkouts. The
in-process run (`tiny_project`'s own checkout) runs meanwhile, as the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from flows.pipeline import STAGES as PIPELINE
from benchmarks.common import pool_workers
from tasks.stages import STAGES
from tests.flows.conftest import PROJECT_ROOT, VENV_BIN
from tests.flows.test_pipeline_flow import client_for

pytestmark = pytest.mark.slow

CODE = ["flows", "tasks", "grc_core", "dvc.yaml", "prefect.yaml", "params.yaml"]


def make_checkout(src: Path, dst: Path, remote: Path, env: dict) -> Path:
    """A copy of the project's code and params with its own git and DVC repo, the remote set in
    .dvc/config.local as a user would point a machine at it."""
    dst.mkdir()
    for name in CODE:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src / name, dst / name)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True, env=env)
    subprocess.run([str(VENV_BIN / "dvc"), "init", "-q"], cwd=dst, check=True, env=env)
    shutil.copy(PROJECT_ROOT / ".dvc" / "config", dst / ".dvc" / "config")  # the committed remote, by name
    (dst / ".dvc" / "config.local").write_text(f"['remote \"storage\"']\n    url = {remote}\n")
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_files(root: Path, *rels: str) -> dict[str, str]:
    out = root / "data" / "tiny"
    return {str(p.relative_to(out)): sha256(p) for rel in rels for p in sorted((out / rel).rglob("*"))
            if p.suffix in (".parquet", ".safetensors") and "ckpt" not in p.parts}  # JSON records hold times


def differences(a, b, path: str = "") -> list[str]:
    """The key paths where two JSON values differ, with both values; timings (`wall_s`) are not compared."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) if k != "wall_s"
                for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def two_pools(tiny_project, prefect_server, tmp_path_factory):
    root, env = tiny_project["root"], tiny_project["env"]
    inprocess = subprocess.Popen([str(VENV_BIN / "python"), "-m", "flows.pipeline"], cwd=root, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = tmp_path_factory.mktemp("pools")
    remote = base / "remote"
    shutil.copy(PROJECT_ROOT / "prefect.yaml", root / "prefect.yaml")
    # no CUDA here: the gpu pool's job variables set the device its stages get to cpu
    text = (root / "prefect.yaml").read_text()
    (root / "prefect.yaml").write_text(text.replace("GRC_DEVICE: cuda", "GRC_DEVICE: cpu"))
    checkouts = {name: make_checkout(root, base / name, remote, env) for name in ("starter", "cpu", "gpu")}
    with pool_workers(prefect_server["url"], {p: checkouts[p] for p in ("cpu", "gpu")}, env, base):
        deploy = subprocess.run([str(VENV_BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=checkouts["starter"],
                                env=env, capture_output=True, text=True)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        t0 = time.perf_counter()
        run = subprocess.run([str(VENV_BIN / "python"), "-m", "flows.pipeline", "-S", "pipeline.executor=deployments"],
                             cwd=checkouts["starter"], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        worker_logs = "".join((base / f"worker-{p}.log").read_text()[-3000:] for p in ("cpu", "gpu"))
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + worker_logs
        # a run whose first stage fails on its worker: the source folder does not exist there
        failing = subprocess.run([str(VENV_BIN / "python"), "-m", "flows.pipeline", "-S", "pipeline.executor=deployments",
                                  "-S", f"datasets.tiny.path={json.dumps(str(base / 'absent'))}"],
                                 cwd=checkouts["starter"], env=env, capture_output=True, text=True)
    out, _ = inprocess.communicate(timeout=1800)
    assert inprocess.returncode == 0, out[-3000:]
    return {"checkouts": checkouts, "reference": root, "wall_s": wall, "failing": failing, "base": base}


def test_each_stage_ran_on_its_pool_as_a_child_of_the_pipeline_run(two_pools, prefect_server):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

    stack, client = client_for(prefect_server["url"])
    with stack:
        deployments = client.read_deployments(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=list(STAGES))))
        by_id = {d.id: d for d in deployments if d.work_pool_name in ("cpu", "gpu")}
        every = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter()) if r.deployment_id in by_id]
        parent_of = {r.id: client.read_flow_run(client.read_task_run(r.parent_task_run_id).flow_run_id) for r in every}
        # the pipeline run of the fixture's good run (the failing run's overrides name another source)
        [parent] = {p.id: p for p in parent_of.values()
                    if p.parameters["overrides"] == ["pipeline.executor=deployments"]}.values()
        runs = [r for r in every if parent_of[r.id].id == parent.id]
    ran = {by_id[r.deployment_id].name: r for r in runs}
    assert sorted(ran) == sorted(name for name, _ in PIPELINE) and len(runs) == len(ran)  # each stage once
    for name, r in ran.items():
        assert r.state.is_completed(), f"{name}: {r.state}"
        assert r.work_pool_name == STAGES[name].pool, name
    assert parent.state.is_completed() and parent.parameters["overrides"] == ["pipeline.executor=deployments"]
    gpu = {d.name: d.job_variables for d in deployments}["backbone"]
    assert gpu["env"] == {"GRC_DEVICE": "cpu"}  # this test's prefect.yaml; the committed one says cuda


def test_a_stage_that_fails_on_its_worker_fails_the_pipeline_with_its_error(two_pools):
    failing, missing = two_pools["failing"], str(two_pools["base"] / "absent")
    out = failing.stdout + failing.stderr
    assert failing.returncode != 0
    assert "ingest (run " in out and "on pool cpu) ended FAILED" in out, out[-3000:]
    assert missing in out, out[-3000:]  # the child's own message, carried up


def test_the_checkouts_share_nothing_but_the_remote(two_pools):
    cpu, gpu = (two_pools["checkouts"][p] / "data" / "tiny" for p in ("cpu", "gpu"))
    assert (cpu / "interactions.duckdb").exists() and not (gpu / "interactions.duckdb").exists()
    assert (gpu / "backbone" / "ckpt").exists() and not (cpu / "backbone").exists()
    # the gpu worker pulled what its stages read: the splits and the tokenizer, made on the cpu worker
    assert (gpu / "splits").is_dir() and (gpu / "tokenizer").is_dir() and not (cpu / "eval").exists()


def test_the_run_pulled_anywhere_equals_the_in_process_run(two_pools):
    starter, reference = two_pools["checkouts"]["starter"], two_pools["reference"]
    pull = subprocess.run([str(VENV_BIN / "dvc"), "pull"], cwd=starter, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
    assert pull.returncode == 0, pull.stdout[-3000:] + pull.stderr[-3000:]
    rels = ("splits", "tokenizer", "backbone", "sasrec", "mine", "sft", "grpo", "vstar", "eval", "candidates")
    got, want = data_files(starter, *rels), data_files(reference, *rels)
    assert any(k.startswith("eval/") for k in want) and any(k.startswith("candidates/part-") for k in want)
    assert got == want
    metrics = [json.loads((r / "reports" / "tiny" / "metrics.json").read_text())
               for r in (two_pools["checkouts"]["gpu"], reference)]
    assert differences(metrics[0]["methods"], metrics[1]["methods"]) == []
    assert metrics[0]["leaderboard"] == metrics[1]["leaderboard"]
