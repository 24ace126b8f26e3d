"""The store and the files of the ingest (items.parquet, splits/) are one unit under faults.

Each fault runs the real flow body (`flows.ingest.ingest_flow`, its Prefect tasks called as plain
functions, no server): killed by SIGKILL at every named point (`GRC_FAULT`, tasks/ingest.py
`fault`), a full disk while the files are written, a second writer beside a paused one. After
each, what a reader gets (the store, and the files of the version it names: `published_paths`,
which tasks/artifacts.py reads through) is wholly the old ingest or wholly the new one, and a
rerun leaves the bytes of an uninterrupted run with nothing of the stopped run behind.

The runs that are killed or paused are forks of one warm process (`ForkServer`) that has imported
prefect and great_expectations, so each costs its ingest rather than those imports. The starting
state of each test (a dataset ingested from source A, a reference ingested from A then B) is
built once per module and copied into the test's own folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb
import polars as pl
import prefect
import pytest

import flows.ingest
from tasks import store
from tasks.ingest import FAULT_ENV, IngestRunning
from tasks.params import load_params
from tests.conftest import LCREC_INTER, LCREC_ITEMS, PROJECT_ROOT, _write
from tests.tasks.test_ingest_stream import as_rows, write_parquet_source

# The flow body in a process of its own, without a Prefect server: tasks run as plain functions.
RUNNER = """
import json, logging, sys
from pathlib import Path
import prefect
prefect.Task.__call__ = lambda self, *args, **kwargs: self.fn(*args, **kwargs)
import flows.ingest
from tasks.params import load_params
flows.ingest.get_run_logger = lambda: logging.getLogger("ingest")
flows.ingest.ingest_flow.fn(load_params(Path(sys.argv[1]), json.loads(sys.argv[2])))
"""

# Imports what every RUNNER imports first, then forks once per request line (JSON: argv for RUNNER,
# the fault, a log file); the fork sets GRC_FAULT, sends its output to the log and runs RUNNER.
# Replies: the fork's pid, then its exit code once it ends (-9: SIGKILL). Neither polars nor DuckDB
# is loaded before a fork, so no thread pool of theirs is copied mid-use.
FORK_SERVER = """
import json, os, sys, traceback
import great_expectations, great_expectations.expectations
import prefect
assert "polars" not in sys.modules and "duckdb" not in sys.modules
fault_env, runner = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while line := sys.stdin.readline():
    argv, fault, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.environ.pop(fault_env, None)
            if fault is not None:
                os.environ[fault_env] = fault
            sys.argv = ["-c", *argv]
            exec(compile(runner, "<runner>", "exec"), {"__name__": "__main__"})
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Forked:
    """A run forked by the server, with the parts of Popen the tests use."""

    def __init__(self, server: "ForkServer", pid: int, log: Path):
        self.server, self.pid, self.log, self.returncode = server, pid, log, None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.server.proc.stdout], [], [], 0)[0]:
            self.returncode = self.server.reply()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def output(self) -> bytes:
        return self.log.read_bytes()

    def communicate(self, timeout: float) -> tuple[bytes, None]:
        if self.returncode is None:
            if not select.select([self.server.proc.stdout], [], [], timeout)[0]:
                os.kill(self.pid, signal.SIGKILL)  # so the server takes the next request
                self.returncode = self.server.reply()
                raise subprocess.TimeoutExpired(f"ingest fork {self.pid}", timeout, self.output())
            self.returncode = self.server.reply()
        return self.output(), None


class ForkServer:
    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0
        self.log = open(folder / "server.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER, FAULT_ENV, RUNNER], cwd=PROJECT_ROOT,
                                     env={k: v for k, v in os.environ.items() if k != FAULT_ENV},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, bufsize=0)
        ready = self.proc.stdout.readline()
        assert ready == b"ready\n", (folder / "server.log").read_text()[-2000:]

    def reply(self) -> int:
        line = self.proc.stdout.readline()
        assert line, f"the fork server died: {(self.folder / 'server.log').read_text()[-2000:]}"
        return int(line)

    def start(self, ds: "Dataset", fault: str | None = None) -> Forked:
        self.count += 1
        log = self.folder / f"run-{self.count}.log"
        self.proc.stdin.write((json.dumps([[str(ds.params_file), json.dumps(ds.overrides)], fault, str(log)])
                               + "\n").encode())
        return Forked(self, self.reply(), log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("forks"))
    yield server
    server.close()


# Source B: source A plus user 3 (its first ingest gives the "new" unit).
NEW_USER = {"3": [9, 9, 9]}
# Every point of the in-memory path, in the order a run passes them.
POINTS = ["locked", "staged_items", "staged_train", "staged_valid", "staged_test", "sealed", "committed",
          "published_items", "published_train", "published_valid", "published_test", "published_MANIFEST", "done"]


class Dataset:
    """One dataset under tmp: params for this process and the command line for a child."""

    def __init__(self, tmp: Path, root: Path, fmt: str = "lcrec", name: str = "data"):
        spec = {"format": fmt, "path": str(root), "prefix": "Tiny", "attributes": ["category", "brand"]}
        self.params_file = tmp / "params.yaml"
        self.params_file.write_text((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
        self.overrides = [f"data.data_dir={json.dumps(str(tmp / name))}",
                          f"data.reports_dir={json.dumps(str(tmp / (name + '_reports')))}",
                          "data.dataset=tiny", f"datasets.tiny={json.dumps(spec)}"]
        self.params = load_params(self.params_file, self.overrides)
        self.out = self.params.dataset_dir()
        self.db = self.out / "interactions.duckdb"


@pytest.fixture
def run_flow(monkeypatch):
    """The flow body in this process, as RUNNER runs it."""
    monkeypatch.setattr(prefect.Task, "__call__", lambda self, *args, **kwargs: self.fn(*args, **kwargs))
    monkeypatch.setattr(flows.ingest, "get_run_logger", lambda: logging.getLogger("ingest"))
    return lambda ds: flows.ingest.ingest_flow.fn(ds.params)


def unit(ds: Dataset) -> dict:
    """What a reader gets: the store's tables and the bytes of the files of the version it names."""
    files = {rel: path.read_bytes() for rel, path in store.published_paths(ds.out).items()}
    tables = {t: store.read_table(ds.db, t) for t in ("items", "interactions")}
    ingests = store.read_table(ds.db, "ingests")["source_hash"].to_list()
    return {"files": files, "tables": {t: f.rows() for t, f in tables.items()}, "ingests": ingests,
            "version": store.published_version(ds.db)}


def in_place(ds: Dataset) -> dict[str, bytes]:
    """The files at their paths (what the stages that read paths directly see), the manifest included."""
    return {rel: (ds.out / rel).read_bytes() for rel in (*store.OUTPUTS, store.MANIFEST)}


def leftovers(ds: Dataset) -> list[str]:
    return sorted(str(p.relative_to(ds.out)) for p in
                  [*ds.out.glob(f"{store.STAGING}*"), *ds.out.glob("**/.*.tmp"), *ds.out.glob(".duckdb_tmp")])


def assert_old_or_new(ds: Dataset, old: dict, new: dict) -> str:
    now = unit(ds)
    assert now in (old, new), "a mix of the old and the new ingest"
    return "old" if now == old else "new"


def assert_like_uninterrupted(ds: Dataset, ref: Dataset, new: dict) -> None:
    assert unit(ds) == new
    assert in_place(ds) == in_place(ref)
    assert store.read_table(ds.db, "exports")["version"].to_list() == \
        store.read_table(ref.db, "exports")["version"].to_list()
    assert leftovers(ds) == []


@contextmanager
def flow_in_process():
    """`run_flow` for the module's fixtures: the patches last only while they build."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prefect.Task, "__call__", lambda self, *args, **kwargs: self.fn(*args, **kwargs))
        patch.setattr(flows.ingest, "get_run_logger", lambda: logging.getLogger("ingest"))
        yield lambda ds: flows.ingest.ingest_flow.fn(ds.params)


def write_lcrec_source(root: Path, inter: dict) -> Path:
    """The files `write_lcrec(inter, folder=...)` writes (tests/conftest.py)."""
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "Tiny.inter.json", inter)
    _write(root / "Tiny.item.json", LCREC_ITEMS)
    return root


def copy_start(start: tuple[Path, dict, dict], tmp: Path, src: str, ref_src: str, fmt: str = "lcrec"):
    """(dataset, reference, old unit, new unit) in a copy of a starting state made once per module."""
    folder, old, new = start
    shutil.copytree(folder, tmp, dirs_exist_ok=True)  # copy2: bytes and mtimes
    ds, ref = Dataset(tmp, tmp / src, fmt=fmt), Dataset(tmp, tmp / ref_src, fmt=fmt, name="ref")
    assert unit(ds) == old and unit(ref) == new  # the copy holds what it was made from
    return ds, ref, old, new


@pytest.fixture(scope="module")
def lcrec_start(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lcrec_start")
    with flow_in_process() as run:
        ref = Dataset(tmp, write_lcrec_source(tmp / "ref_src", LCREC_INTER), name="ref")
        run(ref)
        write_lcrec_source(tmp / "ref_src", {**LCREC_INTER, **NEW_USER})
        ds = Dataset(tmp, write_lcrec_source(tmp / "src", LCREC_INTER))
        run(ds)
        old = unit(ds)
        run(ref)
        new = unit(ref)
    assert old != new and old["ingests"] == new["ingests"][:1]
    write_lcrec_source(tmp / "src", {**LCREC_INTER, **NEW_USER})
    return tmp, old, new


@pytest.fixture
def lcrec_pair(lcrec_start, tmp_path):
    """(dataset ingested from source A, reference: A then B uninterrupted, old unit, new unit);
    the dataset's source is then B."""
    return copy_start(lcrec_start, tmp_path, "src", "ref_src")


@pytest.fixture(scope="module")
def parquet_start(tmp_path_factory):
    """The streaming path's pair, as lcrec_start: user 3 is new in source B."""
    tmp = tmp_path_factory.mktemp("parquet_start")
    seqs = {1: [10, 11, 12, 13], 2: [11, 12, 13]}
    with flow_in_process() as run:
        ref = Dataset(tmp, write_parquet_source(tmp / "ref_pq", as_rows(seqs)), fmt="parquet", name="ref")
        ds = Dataset(tmp, write_parquet_source(tmp / "pq", as_rows(seqs)), fmt="parquet")
        run(ref)
        run(ds)
        old = unit(ds)
        for root in (tmp / "ref_pq", tmp / "pq"):
            write_parquet_source(root, as_rows({3: [10, 10, 10, 11]}, seed=2))
        run(ref)
        new = unit(ref)
    assert old != new and old["ingests"] == new["ingests"][:1]
    return tmp, old, new


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_any_point_leaves_old_or_new_and_a_rerun_finishes_it(lcrec_pair, run_flow, forks, point):
    ds, ref, old, new = lcrec_pair
    child = forks.start(ds, fault=point)
    out, _ = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, f"never reached {point}: {out.decode()[-2000:]}"

    side = assert_old_or_new(ds, old, new)
    # Before the commit the store names the old version; from it on, the new one.
    assert side == ("new" if POINTS.index(point) >= POINTS.index("committed") else "old")
    if side == "old":  # nothing in place was touched
        assert {rel: (ds.out / rel).read_bytes() for rel in store.OUTPUTS} == old["files"]

    run_flow(ds)  # the lock file of the killed run is left behind; its flock died with it
    assert_like_uninterrupted(ds, ref, new)


@pytest.mark.parametrize("point", ["sealed", "committed", "published_valid"])
def test_a_kill_of_the_streaming_ingest_leaves_old_or_new(parquet_start, tmp_path, run_flow, forks, point):
    ds, ref, old, new = copy_start(parquet_start, tmp_path, "pq", "ref_pq", fmt="parquet")
    child = forks.start(ds, fault=point)
    out, _ = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, f"never reached {point}: {out.decode()[-2000:]}"
    assert assert_old_or_new(ds, old, new) == ("old" if point == "sealed" else "new")
    run_flow(ds)
    assert_like_uninterrupted(ds, ref, new)


def full_disk_after(n_writes: int, write):
    """`write` that fails with ENOSPC from call `n_writes` on, leaving half a file behind as a full disk does."""
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n_writes:
            path = Path(args[1] if len(args) > 1 else kwargs.get("file", args[-1]))
            path.write_bytes(b"PAR1" + b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(*args, **kwargs)

    return failing


def test_a_full_disk_while_writing_the_splits_leaves_the_old_unit(lcrec_pair, run_flow, monkeypatch):
    ds, ref, old, new = lcrec_pair
    # Writes: items.parquet, train, valid: the disk fills up on the valid split.
    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(pl.DataFrame, "write_parquet", full_disk_after(3, pl.DataFrame.write_parquet))
        run_flow(ds)
    assert assert_old_or_new(ds, old, new) == "old"
    assert leftovers(ds) == []

    run_flow(ds)
    assert_like_uninterrupted(ds, ref, new)


def test_a_full_disk_while_the_streaming_ingest_copies_leaves_the_old_unit(tmp_path, run_flow, monkeypatch):
    import tasks.ingest

    seqs = {1: [10, 11, 12, 13], 2: [11, 12, 13]}
    ds = Dataset(tmp_path, write_parquet_source(tmp_path / "pq", as_rows(seqs)), fmt="parquet")
    run_flow(ds)
    old = unit(ds)
    write_parquet_source(tmp_path / "pq", as_rows({3: [10, 10, 10, 11]}, seed=2))

    def copy(con, query, path):  # COPY ... TO the second split: the disk is full
        if path.name == "valid.parquet":
            path.write_bytes(b"PAR1")
            raise duckdb.IOException(f'Could not write file "{path}": No space left on device')
        return real_copy(con, query, path)

    real_copy = tasks.ingest.copy_parquet
    with monkeypatch.context() as patch, pytest.raises(duckdb.IOException, match="No space left"):
        patch.setattr(tasks.ingest, "copy_parquet", copy)
        run_flow(ds)
    assert unit(ds) == old
    assert leftovers(ds) == []
    run_flow(ds)
    assert unit(ds)["ingests"] == old["ingests"] + [store.latest_source_hash(ds.db)]
    assert leftovers(ds) == []


@pytest.mark.parametrize("point", ["sealed", "committed"])
def test_an_overlapping_writer_is_refused_and_the_paused_one_finishes(lcrec_pair, run_flow, forks, point):
    ds, ref, old, new = lcrec_pair
    first = forks.start(ds, fault=f"{point}:stop")  # paused before (sealed) or after (committed) its store commit
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and stopped(first.pid) is False:
            time.sleep(0.1)
        assert stopped(first.pid), (first.output().decode()[-2000:] if first.poll() is not None else "")
        assert assert_old_or_new(ds, old, new) == ("old" if point == "sealed" else "new")

        with pytest.raises(IngestRunning, match=rf"another ingest of tiny is running \(pid {first.pid} on .* since "
                                                rf".*\); wait for it or remove .*\.ingest\.lock if that process is gone"):
            run_flow(ds)
        assert assert_old_or_new(ds, old, new) == ("old" if point == "sealed" else "new")
    finally:
        first.send_signal(signal.SIGCONT)
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out.decode()[-2000:]
    # One `ingests` row for source B, not one per writer.
    assert_like_uninterrupted(ds, ref, new)
    run_flow(ds)  # unchanged source: nothing more
    assert_like_uninterrupted(ds, ref, new)


def stopped(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:  # ended, and reaped by the fork server
        return False
    return text[text.rindex(")") + 2:].split()[0] == "T"


def test_the_next_run_removes_leftover_temp_and_staged_files(lcrec_pair, run_flow):
    ds, ref, old, new = lcrec_pair
    run_flow(ds)
    made = [ds.out / ".items.parquet.x1.tmp", ds.out / "splits" / ".train.parquet.x2.tmp",
            ds.out / f"{store.STAGING}tmp-x3" / "items.parquet", ds.out / f"{store.STAGING}{'0' * 64}" / "items.parquet",
            ds.out / ".duckdb_tmp" / "spill.tmp"]
    for path in made:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by a killed run")
    assert len(leftovers(ds)) == 5

    run_flow(ds)
    assert_like_uninterrupted(ds, ref, new)


def test_a_reader_refuses_files_of_another_version_than_the_stores(lcrec_pair, run_flow):
    from tasks.artifacts import load_rows

    ds, ref, old, new = lcrec_pair
    run_flow(ds)
    assert len(load_rows(ds.out, "test").targets) == 4  # four users in source B
    (ds.out / store.MANIFEST).write_text(json.dumps({"version": "0" * 64}))  # e.g. files copied from elsewhere
    with pytest.raises(ValueError, match="the files in place are version 000000000000, the store names"):
        load_rows(ds.out, "test")
