"""A stage's temporary Prefect server exits when the stage dies, however it dies.

Without PREFECT_API_URL, Prefect 3.8 runs a flow against a temporary server: `SubprocessASGIServer`
(prefect/server/api/server.py) starts `python -m uvicorn ...` as a child process and stops it from
an atexit hook. A stage killed by SIGKILL or the OOM killer runs no atexit hook, and its server
(about 220 MB) stayed up. `guard_temporary_server()` makes that child watch its parent: its command
becomes `python -c WATCHDOG <stage pid> <uvicorn arguments>`, which starts a thread that polls the
parent pid and then runs uvicorn as `-m uvicorn` would. Once the parent is gone the thread sends the
server SIGTERM (uvicorn shuts down cleanly) and exits hard 10 s later if that hangs.

Not PR_SET_PDEATHSIG: it fires when the *thread* that started the child ends, and Prefect starts the
server from whichever thread first needs the API (its events and log workers are threads).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

WATCHDOG = """\
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def guarded_command(args: list[str], parent: int) -> list[str]:
    """`python -m uvicorn ARGS` -> `python -c WATCHDOG PARENT ARGS`; any other command as it is."""
    if list(args[1:3]) != ["-m", "uvicorn"]:
        return args
    return [args[0], "-c", WATCHDOG, str(parent), *args[3:]]


class _GuardedPopen(subprocess.Popen):
    def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
        super().__init__(guarded_command(list(args), os.getpid()), *rest, **kwargs)


class _GuardedSubprocess:
    """The `subprocess` module as prefect.server.api.server sees it: its Popen adds the watchdog."""

    Popen = _GuardedPopen

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def guard_temporary_server() -> None:
    """Give the temporary server, if this process will start one, the parent-death watchdog."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return  # no temporary server; importing the server module would cost 2 s for nothing
    from prefect.server.api import server

    server.subprocess = _GuardedSubprocess()
