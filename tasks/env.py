"""The one place that sets the environment every entry point needs.

Prefect, DVC and Hugging Face must run offline, quietly and inside the project.
`configure()` only sets variables that are not already set, so a user can point
`PREFECT_API_URL` at a running server or `PREFECT_HOME` elsewhere. It must run
before `prefect` is imported: `tasks/__init__.py` and `flows/__init__.py` call it,
and the Makefile exports the same values for the `dvc` and `prefect` commands.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULTS = {
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
    # The first start of the temporary API on 2 cores takes 30-40 s; the default is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
