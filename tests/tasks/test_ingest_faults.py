"""The store and the files of the ingest (items.parquet, splits/) are one unit under faults.

Each fault runs the real flow body (`flows.ingest.ingest_flow`, its Prefect tasks called as plain
functions, no server): killed by SIGKILL at every named point (`GRC_FAULT`, tasks/ingest.py
`fault`), a full disk while the files are written, a second writer beside a paused one. After
each, what a reader gets (the store, and the files of the version it names: `published_paths`,
which tasks/artifacts.py reads through) is wholly the old ingest or wholly the new one, and a
rerun leaves the bytes of an uninterrupted run with nothing of the stopped run behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import prefect
import pytest

import flows.ingest
from tasks import store
from tasks.ingest import FAULT_ENV, IngestRunning
from tasks.params import load_params
from tests.conftest import LCREC_INTER, PROJECT_ROOT
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

    def child(self, fault: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
        if fault is not None:
            env[FAULT_ENV] = fault
        return subprocess.Popen([sys.executable, "-c", RUNNER, str(self.params_file), json.dumps(self.overrides)],
                                cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


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


@pytest.fixture
def lcrec_pair(write_lcrec, tmp_path, run_flow):
    """(dataset ingested from source A, reference: A then B uninterrupted, old unit, new unit);
    the dataset's source is then B."""
    ref = Dataset(tmp_path, write_lcrec(folder="ref_src"), name="ref")
    run_flow(ref)
    write_lcrec({**LCREC_INTER, **NEW_USER}, folder="ref_src")
    ds = Dataset(tmp_path, write_lcrec(folder="src"))
    run_flow(ds)
    old = unit(ds)
    run_flow(ref)
    new = unit(ref)
    assert old != new and old["ingests"] == new["ingests"][:1]
    write_lcrec({**LCREC_INTER, **NEW_USER}, folder="src")
    return ds, ref, old, new


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_any_point_leaves_old_or_new_and_a_rerun_finishes_it(lcrec_pair, run_flow, point):
    ds, ref, old, new = lcrec_pair
    child = ds.child(fault=point)
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
def test_a_kill_of_the_streaming_ingest_leaves_old_or_new(tmp_path, run_flow, point):
    seqs = {1: [10, 11, 12, 13], 2: [11, 12, 13]}
    ref = Dataset(tmp_path, write_parquet_source(tmp_path / "ref_pq", as_rows(seqs)), fmt="parquet", name="ref")
    ds = Dataset(tmp_path, write_parquet_source(tmp_path / "pq", as_rows(seqs)), fmt="parquet")
    run_flow(ref)
    run_flow(ds)
    old = unit(ds)
    for root in (tmp_path / "ref_pq", tmp_path / "pq"):
        write_parquet_source(root, as_rows({3: [10, 10, 10, 11]}, seed=2))
    run_flow(ref)
    new = unit(ref)

    child = ds.child(fault=point)
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
def test_an_overlapping_writer_is_refused_and_the_paused_one_finishes(lcrec_pair, run_flow, point):
    ds, ref, old, new = lcrec_pair
    first = ds.child(fault=f"{point}:stop")  # paused before (sealed) or after (committed) its store commit
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and stopped(first.pid) is False:
            time.sleep(0.1)
        assert stopped(first.pid), (first.stdout.read().decode()[-2000:] if first.poll() is not None else "")
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
    text = Path(f"/proc/{pid}/stat").read_text()
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
