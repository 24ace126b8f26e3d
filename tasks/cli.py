"""The command line every flow shares: `python -m flows.<stage> [-P params.yaml] [-S key=value ...] [--debug]`.

`run_main(main)` runs a flow module's `main(argv)` as a command. An input error prints one message
and a hint to stderr and exits with INPUT_ERROR_EXIT: a params key (ParamsError), a malformed
source file (InputError), a failed quality gate (QualityGateError), a missing input file
(FileNotFoundError) or a ValueError that our own code raised. Prefect's console copies of that
error (with their tracebacks) are dropped; the API still gets them, so the UI shows the traceback.
Any other exception keeps its traceback. `--debug` or GRC_DEBUG=1 shows everything. `main` itself
raises, for callers and tests.
"""

from __future__ import annotations

import argparse
import linecache
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from tasks.env import PROJECT_ROOT
from tasks.params import Params, load_params
from tasks.server_guard import guard_temporary_server

DEBUG_ENV = "GRC_DEBUG"
INPUT_ERROR_EXIT = 2

# Known input errors by (module, class): what to do. Matched by name, not imported: importing
# tasks.readers here would put it into every stage's code deps (dvc.yaml), and re-run them all.
HINTS = {
    ("tasks.params", "ParamsError"): "fix params.yaml (or the -P file) or the -S override",
    ("tasks.readers", "InputError"): "fix the source file, or point the dataset's path in params.yaml at a good copy",
    ("tasks.quality", "QualityGateError"): "fix the data or the params the gate checks; its report is under "
                                           "reports/<dataset>/gates/",
    ("tasks.ingest", "IngestRunning"): "wait for the other ingest of this dataset to finish",
    ("builtins", "FileNotFoundError"): "run the stage that makes it first (`dvc repro` runs every stage this one "
                                       "needs), or fix its path in params.yaml",
}
OWN_VALUE_ERROR = "fix the input it names"
OWN_CODE = tuple(str(PROJECT_ROOT / package) + os.sep for package in ("flows", "tasks", "grc_core"))


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-P", "--params", default=None, help="params file (default: params.yaml at the project root)")
    p.add_argument(
        "-S", "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a params.yaml key, e.g. -S data.dataset=scientific (repeatable; the syntax of `dvc exp run -S`)",
    )
    p.add_argument("--debug", action="store_true",
                   help=f"on an input error, show the full traceback (also: {DEBUG_ENV}=1)")
    return p


def parse_args(argv: Sequence[str] | None, description: str | None) -> argparse.Namespace:
    args = parser(description).parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    return args


def parse_cli(argv: Sequence[str] | None, description: str | None) -> Params:
    args = parse_args(argv, description)
    return load_params(args.params, args.set)


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def hint(exc: BaseException) -> str | None:
    """What to do about `exc` if it is an input error; None for anything else (a bug keeps its traceback)."""
    for cls in type(exc).__mro__:
        if (cls.__module__, cls.__qualname__) in HINTS:
            return HINTS[cls.__module__, cls.__qualname__]
    if isinstance(exc, ValueError) and raised_by_us(exc):
        return OWN_VALUE_ERROR
    return None


def raised_by_us(exc: BaseException) -> bool:
    """True when a `raise` statement in flows/, tasks/ or grc_core/ raised `exc` (a check of ours),
    not a library or a builtin such as int("x")."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    in_our_code = os.path.realpath(filename).startswith(OWN_CODE)
    return in_our_code and linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


class _DropInputErrors(logging.Filter):
    """Prefect logs a failed run's exception with its traceback, then its final state, which repeats
    the message (a task's, then its flow's); for an input error run_main prints it once instead.
    Only the console is filtered: the API gets every record, so the UI shows the traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_runs: set[str] = set()  # runs whose input error was dropped

    def filter(self, record: logging.LogRecord) -> bool:
        if debugging() or not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        run = str(getattr(record, "task_run_id", None) or getattr(record, "flow_run_id", None))
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and hint(exc) is not None:
            self.failed_runs.add(run)
            return False
        return not (run in self.failed_runs and record.getMessage().startswith("Finished in state"))


def quiet_prefect_console() -> None:
    """Filter the console handler Prefect's logging config puts on the root logger (set up on import)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, _DropInputErrors)
                                                                  for f in handler.filters):
            handler.addFilter(_DropInputErrors())


def stage_name(main: Callable[..., Any]) -> str:
    spec = main.__globals__.get("__spec__")
    return (spec.name if spec is not None else Path(sys.argv[0]).stem).rpartition(".")[2]


def run_main(main: Callable[[list[str]], Any], argv: Sequence[str]) -> None:
    """Run `main(argv)` as the stage's command; see the module docstring."""
    guard_temporary_server()
    quiet_prefect_console()
    try:
        main(list(argv))
    except Exception as exc:
        what_to_do = hint(exc)
        if what_to_do is None or debugging():
            raise
        print(f"{stage_name(main)}: {exc}\n  hint: {what_to_do}; --debug shows the traceback", file=sys.stderr)
        sys.exit(INPUT_ERROR_EXIT)
