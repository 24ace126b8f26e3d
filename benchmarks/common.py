"""Shared helpers for benchmarks: machine description, result files, running flows in a scratch dir."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from grc_core.data import Instances
from tasks import io
from tasks.artifacts import load_split
from tasks.env import PROJECT_ROOT
from tasks.evaluate import ranks_dir
from tasks.io import write_json

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0]}


def commit() -> str:
    """The short hash of this checkout's HEAD (the working tree may differ: JSONs say so where it matters)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True).stdout.strip()


def copy_run(src: Path, dst: Path, skip: Iterable[str] = ()) -> None:
    """Copy a finished run's dataset folder `src` into `dst`, less the entries named in `skip` and
    those `dst` already has (a resumed benchmark keeps what it built there, and gains what `src`
    made since, e.g. a SASRec trained after the benchmark's backbone)."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name not in skip and not (dst / entry.name).exists():
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, dst / entry.name)


def stamp(settings: dict) -> dict:
    return {"command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "settings": settings}


def save(name: str, payload: dict) -> Path:
    path = RESULTS / f"{name}.json"
    write_json(path, payload)
    print(json.dumps(payload, indent=2, default=str))
    return path


def run_flow(stage: str, overrides: list[str]) -> float:
    """Run `python -m flows.<stage> -S ...` in a subprocess; return its wall time in seconds."""
    cmd = [sys.executable, "-m", f"flows.{stage}", *[a for o in overrides for a in ("-S", o)]]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=PROJECT_ROOT, check=True)
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(home: Path, wait_s: float = 300.0) -> Iterator[dict]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (`home`); yields
    {"url": its API URL, "home": home}, stops it on exit. A first start migrates the database:
    30-40 s on a quiet 2-core machine, over 120 s beside other jobs."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}  # the UI's calls
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + wait_s
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"prefect server did not start; log: {(home / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield {"url": url, "home": home}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def pool_workers(url: str, checkouts: dict[str, Path], env: dict, logs: Path, query_s: float = 1.0) -> Iterator[None]:
    """Create each pool of `checkouts` (pool name -> checkout) as a process work pool on the server
    at `url` (what `prefect work-pool create --type process` sets), start one worker of it in its
    checkout (`prefect worker start --pool <pool> --limit 1`, log `<logs>/worker-<pool>.log`,
    PREFECT_HOME `<logs>/home-<pool>`), and stop them on exit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        template = ProcessWorker.get_default_base_job_template()
        for pool in checkouts:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
    workers, files = [], []
    try:
        for pool, checkout in checkouts.items():
            home = logs / f"home-{pool}"
            home.mkdir(parents=True, exist_ok=True)
            files.append(open(logs / f"worker-{pool}.log", "w"))
            workers.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--limit", "1"],
                cwd=checkout, env={**env, "PREFECT_API_URL": url, "PREFECT_HOME": str(home),
                                   "PREFECT_WORKER_QUERY_SECONDS": str(query_s)},
                stdout=files[-1], stderr=subprocess.STDOUT, start_new_session=True))
        yield
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in files:
            f.close()


def stage_users(out_dir: Path, split: str, max_history: int, method: str = "sasrec") -> Instances:
    """The split's instances that the evaluate stage ranked (the users of its rank file of `method`),
    for a benchmark whose ranks are paired with the stage's."""
    recorded = io.read_parquet(ranks_dir(out_dir, split) / f"{method}.parquet")
    inst = load_split(out_dir, split, max_history)
    return inst.select(torch.as_tensor(np.flatnonzero(np.isin(inst.user.numpy(), recorded["user_id"].to_numpy()))))


def check_stage_ranks(out_dir: Path, split: str, method: str, users: np.ndarray, ranks: np.ndarray,
                      consequence: str) -> None:
    """Refuse a benchmark's recomputation of `method` whose per-user ranks differ from the evaluate
    stage's rank file (other users, or another rank for any user); `consequence` says what that breaks."""
    path = ranks_dir(out_dir, split) / f"{method}.parquet"
    recorded = io.read_parquet(path)
    mine = dict(zip(users.tolist(), ranks.tolist()))
    if len(mine) != recorded.height or any(mine.get(u) != r for u, r in zip(recorded["user_id"].to_list(),
                                                                           recorded["rank"].to_list())):
        raise ValueError(f"{path}: {method}'s ranks recomputed here differ from the evaluate stage's; {consequence}")


def copy_stage_ranks(out_dir: Path, split: str, root: str, methods: Iterable[str]) -> None:
    """The evaluate stage's rank files of `methods` (those it wrote) copied beside a benchmark's own
    under `root`, so that `benchmarks.seeds_table --eval-subdir <root>` pairs them."""
    for name in methods:
        src = ranks_dir(out_dir, split) / f"{name}.parquet"
        if src.exists():
            shutil.copyfile(src, ranks_dir(out_dir, split, root) / f"{name}.parquet")
