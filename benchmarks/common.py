"""Shared helpers for benchmarks: machine description, result files, running flows in a scratch dir."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from tasks.env import PROJECT_ROOT
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
