"""A stage killed by SIGKILL (an OOM kill, `kill -9`) leaves no process behind.

Without `PREFECT_API_URL` a flow starts a temporary Prefect server (uvicorn, about 220 MB) as a
child process; the stage stops it at exit, which a killed stage never reaches. The server must
notice its parent's death and exit by itself (tasks/server_guard.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flows.conftest import PROJECT_ROOT, write_synthetic_lcrec


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every living descendant of `root` (from /proc: no `children` files here)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = st
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start, _) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def alive(pid: int, start: int) -> bool:
    """The same process (not a reused pid) still runs; a zombie has exited."""
    st = _stat(pid)
    return st is not None and st[1] == start and st[2] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_stage_leaves_no_temporary_prefect_server(tmp_path):
    write_synthetic_lcrec(tmp_path / "source")
    spec = {"format": "lcrec", "path": str(tmp_path / "source"), "prefix": "Tiny", "attributes": ["category", "brand"]}
    overrides = [f"data.data_dir={tmp_path / 'data'}", f"data.reports_dir={tmp_path / 'reports'}",
                 "data.dataset=tiny", f"datasets.tiny={json.dumps(spec)}"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # so it starts its own server
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    log = open(tmp_path / "stage.log", "w")
    stage = subprocess.Popen([sys.executable, "-m", "flows.ingest", *[a for o in overrides for a in ("-S", o)]],
                             cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started: dict[int, int] = {}
    try:
        deadline = time.time() + 150
        # Wait for the server to be up, i.e. for the flow run to begin: the state a real run is killed in.
        while time.time() < deadline and stage.poll() is None and "Beginning flow run" not in \
                (tmp_path / "stage.log").read_text():
            time.sleep(0.2)
        assert stage.poll() is None, (tmp_path / "stage.log").read_text()[-3000:]
        started = descendants(stage.pid)
        assert any("uvicorn" in cmdline(pid) for pid in started), \
            f"no temporary server among {[cmdline(p) for p in started]}"
        stage.send_signal(signal.SIGKILL)
        stage.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(alive(pid, start) for pid, start in started.items()):
            time.sleep(0.5)
        left = [f"{pid}: {cmdline(pid)}" for pid, start in started.items() if alive(pid, start)]
        assert not left, f"still running 20 s after the stage was killed: {left}"
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
        for pid, start in started.items():  # do not leave the test's own orphans behind when it fails
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        log.close()
