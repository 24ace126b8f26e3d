"""A stage's input error is one message naming the file or key, a hint, and exit status 2.

Params errors happen before any flow run, so those commands need no Prefect server (PREFECT_API_URL
points at a closed port that is never contacted); errors inside a flow run use the session server.
`--debug` (or GRC_DEBUG=1) brings the traceback back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import cli
from tasks.artifacts import model_dir
from tasks.cli import INPUT_ERROR_EXIT, hint, run_main
from tasks.env import PROJECT_ROOT
from tasks.params import ParamsError
from tasks.quality import QualityGateError
from tasks.readers import InputError, read_lcrec
from tests.flows.conftest import write_synthetic_lcrec

PREFECT_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| ")
NO_SERVER = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}  # set, so no temporary server; never contacted
DEEP = 200_000


def stage(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def own_lines(stderr: str) -> list[str]:
    """stderr less Prefect's log lines (a flow run's "Beginning flow run", "View at ...")."""
    return [line for line in stderr.splitlines() if not PREFECT_LOG_LINE.match(line)]


def assert_one_message(done: subprocess.CompletedProcess, stage_name: str, *named: str) -> None:
    assert done.returncode == INPUT_ERROR_EXIT, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = own_lines(done.stderr)
    assert len(lines) == 2, lines  # the message and the hint
    assert lines[0].startswith(f"{stage_name}: ") and lines[1].startswith("  hint: "), lines
    for text in named:
        assert text in lines[0], lines
        assert done.stderr.count(text) == 1, done.stderr  # said once, not again by Prefect's logs


@pytest.mark.parametrize("module", ["flows.ingest", "flows.pipeline"])
def test_an_override_that_is_not_yaml_names_the_override(module):
    done = stage(module, "-S", "data.max_history=[1", env=NO_SERVER)
    assert_one_message(done, module.split(".")[1], "override 'data.max_history=[1'", "not valid YAML")


def test_deeply_nested_yaml_is_a_params_error_not_a_recursion_error(tmp_path):
    # 100,000: one command-line argument holds at most 128 KiB (MAX_ARG_STRLEN)
    done = stage("flows.ingest", "-S", "data.max_history=" + "[" * 100_000, env=NO_SERVER)
    assert_one_message(done, "ingest", "override 'data.max_history=[[[", "nested too deeply")
    assert len(done.stderr) < 1000  # the value is not echoed
    path = tmp_path / "params.yaml"
    path.write_text("[" * DEEP)
    assert_one_message(stage("flows.ingest", "-P", str(path), env=NO_SERVER), "ingest",
                       f"{path}: not valid YAML: nested too deeply")


def test_a_params_file_that_is_a_directory(tmp_path):
    done = stage("flows.embed", "-P", str(tmp_path), env=NO_SERVER)
    assert_one_message(done, "embed", f"{tmp_path}: params file is a directory")


def test_a_binary_params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(bytes(range(128, 256)) * 4)
    done = stage("flows.tokenize", "-P", str(path), env=NO_SERVER)
    assert_one_message(done, "tokenize", f"{path}: not a UTF-8 YAML file (byte 0 is 0x80)")


@pytest.mark.parametrize("flag, env", [("--debug", {}), (None, {"GRC_DEBUG": "1"})])
def test_debug_shows_the_traceback(tmp_path, flag, env):
    done = stage("flows.embed", "-P", str(tmp_path), *([flag] if flag else []), env={**NO_SERVER, **env})
    assert done.returncode not in (0, INPUT_ERROR_EXIT)
    assert "Traceback (most recent call last)" in done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert last == f"tasks.params.ParamsError: {tmp_path}: params file is a directory; -P takes a YAML file such as " \
                   "params.yaml"


def test_a_json_source_nested_200000_deep_is_an_input_error_naming_the_file(write_lcrec):
    root = write_lcrec(inter="[" * DEEP + "]" * DEEP)
    with pytest.raises(InputError, match=re.escape(f"{root / 'Tiny.inter.json'}: invalid JSON (arrays or objects "
                                                   "nested too deeply)")):
        read_lcrec(root, "Tiny")


def test_known_input_errors_and_bugs():
    assert hint(ParamsError("x")) and hint(InputError("x")) and hint(QualityGateError("x"))
    assert hint(FileNotFoundError("x"))
    with pytest.raises(ValueError) as ours:
        model_dir(Path("."), "no-such-method")  # a check of ours: a `raise` in tasks/artifacts.py
    assert hint(ours.value) == cli.OWN_VALUE_ERROR
    with pytest.raises(ValueError) as builtin:
        int("x")  # raised inside this test, by a builtin: not a check of ours
    assert hint(builtin.value) is None
    assert hint(RuntimeError("x")) is None and hint(KeyError("x")) is None


def test_run_main_exits_2_with_one_message_and_reraises_anything_else(monkeypatch, capsys):
    monkeypatch.setattr(cli, "guard_temporary_server", lambda: None)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def bad_params(argv):
        raise ParamsError(f"data.max_history must be >= 1, got {argv[0]}")

    with pytest.raises(SystemExit) as exited:
        run_main(bad_params, ["0"])
    assert exited.value.code == INPUT_ERROR_EXIT
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "test_cli_errors: data.max_history must be >= 1, got 0" and len(err) == 2

    def bug(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_main(bug, [])


# Errors inside a flow run: Prefect logs them too (with tracebacks) unless they are filtered.


def _server_env(server: dict) -> dict[str, str]:
    return {"PREFECT_API_URL": server["url"], "PREFECT_HOME": str(server["home"]), "OMP_NUM_THREADS": "1"}


def _tiny(tmp_path: Path, source: Path) -> list[str]:
    spec = {"format": "lcrec", "path": str(source), "prefix": "Tiny", "attributes": ["category", "brand"]}
    overrides = [f"data.data_dir={tmp_path / 'data'}", f"data.reports_dir={tmp_path / 'reports'}",
                 "data.dataset=tiny", f"datasets.tiny={json.dumps(spec)}"]
    return [a for o in overrides for a in ("-S", o)]


@pytest.mark.slow
def test_a_missing_upstream_artifact(tmp_path, prefect_server):
    args = _tiny(tmp_path, tmp_path / "source")
    done = stage("flows.embed", *args, env=_server_env(prefect_server))
    missing = str(tmp_path / "data" / "tiny" / "items.parquet")
    assert_one_message(done, "embed", missing)
    assert "run the stage that makes it first" in own_lines(done.stderr)[1]
    debug = stage("flows.embed", *args, "--debug", env=_server_env(prefect_server))
    assert debug.returncode not in (0, INPUT_ERROR_EXIT)
    # Prefect's own error log and the final traceback are back
    assert debug.stderr.count("Traceback (most recent call last)") >= 2 and "Encountered exception" in debug.stderr


@pytest.mark.slow
def test_a_source_nested_200000_deep_inside_a_flow_run(tmp_path, prefect_server):
    write_synthetic_lcrec(tmp_path / "source")
    (tmp_path / "source" / "Tiny.inter.json").write_text("[" * DEEP + "]" * DEEP)
    done = stage("flows.ingest", *_tiny(tmp_path, tmp_path / "source"), env=_server_env(prefect_server))
    assert_one_message(done, "ingest", f"{tmp_path / 'source' / 'Tiny.inter.json'}: invalid JSON")


@pytest.mark.slow
def test_a_failed_quality_gate_is_said_once(tmp_path, prefect_server):
    """Was 129 lines with the message three times (the task's log, the flow's log, the traceback)."""
    write_synthetic_lcrec(tmp_path / "source")  # 5 to 8 interactions per user
    done = stage("flows.ingest", *_tiny(tmp_path, tmp_path / "source"), "-S", "data.min_sequence_length=20",
                 "-S", "data.drop_short_users=false", env=_server_env(prefect_server))
    assert done.returncode == INPUT_ERROR_EXIT and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = own_lines(done.stderr)
    assert lines[0] == "ingest: quality gate 'sequence_lengths' failed:" and lines[-1].startswith("  hint: ")
    assert len(lines) <= 5 and done.stderr.count("quality gate 'sequence_lengths' failed") == 1, done.stderr
