"""Candidate dumps: the gate, the users file, SASRec scores, and a real SIGKILL mid-dump.

The tiny setup writes a data dir in the project's formats (splits, items, semantic IDs, a
randomly initialised backbone and SASRec) under tmp_path, so no pipeline stage has to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from grc_core.data import make_instances
from grc_core.model import ModelConfig
from grc_core.sasrec import SASRec, topk_items
from tasks import io
from tasks.artifacts import sasrec_top
from tasks.candidates import MANIFEST, current_shard, gate_shard, plan_dump, read_users_file, top_lists
from tasks.env import PROJECT_ROOT
from tasks.params import load_params
from tasks.training import build_model
from tasks.quality import QualityGateError
from tests.grc_core.test_sasrec import sasrec_cfg

N_USERS, N_ITEMS, LEVELS = 120, 48, [6, 8]  # item i has semantic ID (i // 8, i % 8)
TINY = ["candidates.method=tiger", "candidates.top_n=5", "candidates.beam=10", "candidates.users_per_shard=10",
        "candidates.batch_size=16"]


def write_tiny_data(root: Path, seed: int = 0) -> Path:
    """data/tiny/ with a test split, items, semantic IDs, and untrained backbone and SASRec weights."""
    ds = root / "tiny"
    rng = np.random.default_rng(seed)
    items = pl.DataFrame({"item_id": np.arange(N_ITEMS), "category_bucket": np.arange(N_ITEMS) // 8 + 1})
    io.write_parquet(ds / "items.parquet", items)
    histories = [rng.integers(0, N_ITEMS, int(rng.integers(2, 10))).tolist() for _ in range(N_USERS)]
    io.write_parquet(ds / "splits" / "test.parquet", pl.DataFrame(
        {"user_id": np.arange(N_USERS), "target_pos": [len(h) for h in histories], "history": histories,
         "target": rng.integers(0, N_ITEMS, N_USERS)},
        schema={"user_id": pl.Int64, "target_pos": pl.Int64, "history": pl.List(pl.Int32), "target": pl.Int32}))
    codes = np.stack([np.arange(N_ITEMS) // 8, np.arange(N_ITEMS) % 8], 1).tolist()
    io.write_parquet(ds / "tokenizer" / "semantic_ids.parquet", pl.DataFrame(
        {"item_id": np.arange(N_ITEMS), "codes": codes}, schema={"item_id": pl.Int64, "codes": pl.List(pl.Int32)}))
    io.write_json(ds / "tokenizer" / "tokenizer.json", {"level_sizes": LEVELS})
    cfg = ModelConfig(d_model=16, d_ff=32, n_heads=2, encoder_layers=1, decoder_layers=1, dropout=0.0,
                      layout="item", max_history=load_params().data.max_history)  # the stage pads to it
    model = build_model(cfg, LEVELS, [7], N_ITEMS, seed)
    io.write_safetensors(ds / "backbone" / "model.safetensors", model.state_dict())
    io.write_json(ds / "backbone" / "config.json", {**model.architecture(), "attributes": ["category"]})
    torch.manual_seed(seed)
    scfg = sasrec_cfg(hidden=16, layers=1, dropout=0.0)
    io.write_safetensors(ds / "sasrec" / "model.safetensors", SASRec(N_ITEMS, scfg).state_dict())
    io.write_json(ds / "sasrec" / "config.json", {"config": asdict(scfg), "n_items": N_ITEMS})
    # evaluate's validation ranks of the dumped method, which the promotion gate reads (0 = a miss)
    io.write_parquet(ds / "eval" / "valid" / "tiger.parquet", pl.DataFrame(
        {"user_id": np.arange(N_USERS), "rank": rng.integers(0, 30, N_USERS)},
        schema={"user_id": pl.Int64, "rank": pl.Int64}))
    return ds


def overrides(root: Path, *extra: str) -> list[str]:
    spec = {"format": "lcrec", "path": str(root), "prefix": "Tiny", "attributes": ["category"]}
    return [f"data.data_dir={json.dumps(str(root / 'data'))}", f"data.reports_dir={json.dumps(str(root / 'reports'))}",
            "data.dataset=tiny", f"datasets.tiny={json.dumps(spec)}", *TINY, *extra]


def good_frame(users=(3, 7), top_n=3) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    items = np.stack([rng.permutation(20)[:top_n] for _ in users])
    scores = -np.sort(rng.random((len(users), top_n)), axis=1)  # best first
    return top_lists(np.asarray(users, dtype=np.int64), items, scores.astype(np.float32), top_n)


def gate(frame: pl.DataFrame, n_users=2, top_n=3):
    return gate_shard.fn(frame, n_users, top_n, 20, None)


def test_gate_accepts_a_good_shard():
    frame = good_frame()
    assert frame.schema == {"user_id": pl.Int64, "rank": pl.Int32, "item_id": pl.Int64, "score": pl.Float32}
    assert frame["rank"].to_list() == [1, 2, 3, 1, 2, 3]
    assert gate(frame)["success"]
    # GRC backfill: the last two places of user 7 are drafts with score -inf
    backfilled = frame.with_columns(pl.when((pl.col("user_id") == 7) & (pl.col("rank") > 1)).then(-np.inf)
                                    .otherwise(pl.col("score")).cast(pl.Float32).alias("score"))
    assert gate(backfilled)["success"]


@pytest.mark.parametrize("column, breaks", [
    ("item_id", lambda f: f.with_columns(pl.when(pl.col("rank") == 2).then(f["item_id"][0])
                                         .otherwise(pl.col("item_id")).alias("item_id"))),  # user 3 gets an item twice
    ("item_id", lambda f: f.with_columns(pl.when(pl.col("rank") == 1).then(20)  # the catalog is 0..19
                                         .otherwise(pl.col("item_id")).cast(pl.Int64).alias("item_id"))),
    ("score_step", lambda f: f.with_columns(pl.when(pl.col("rank") == 3).then(0.5)
                                            .otherwise(pl.col("score")).cast(pl.Float32).alias("score"))),
    ("user_rows", lambda f: f.filter(~((pl.col("user_id") == 7) & (pl.col("rank") == 3)))),
    ("rank", lambda f: f.with_columns(pl.col("rank") - 1)),
    ("score", lambda f: f.with_columns(pl.when(pl.col("rank") == 3).then(np.nan)
                                       .otherwise(pl.col("score")).cast(pl.Float32).alias("score"))),
    ("score", lambda f: f.with_columns(pl.when(pl.col("rank") == 1).then(np.inf)
                                       .otherwise(pl.col("score")).cast(pl.Float32).alias("score"))),
    ("score_step", lambda f: f.with_columns(pl.when(pl.col("rank") == 2).then(-np.inf)  # -inf, then a score
                                            .otherwise(pl.col("score")).cast(pl.Float32).alias("score"))),
])
def test_gate_refuses_a_bad_shard_naming_the_column(column, breaks):
    with pytest.raises(QualityGateError) as info:
        gate(breaks(good_frame()))
    assert f"column {column!r}" in str(info.value) or f"'{column}'" in str(info.value), str(info.value)


def test_a_user_short_of_top_n_items_is_an_error_naming_the_user():
    items = np.array([[4, 5, 6], [1, -1, -1]])
    scores = np.array([[-1.0, -2.0, -3.0], [-1.0, -np.inf, -np.inf]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"user_id 12 gets only 1 items .* raise candidates.beam"):
        top_lists(np.array([11, 12]), items, scores, top_n=2)
    assert top_lists(np.array([11, 12]), items, scores, top_n=1).height == 2
    backfilled = top_lists(np.array([11, 12]), np.array([[4, 5, 6], [1, 2, -1]]), scores, top_n=2)
    assert backfilled["item_id"].to_list() == [4, 5, 1, 2]  # a real item scored -inf is listed
    assert backfilled["score"].to_list()[-1] == -np.inf


def test_parquet_writes_are_byte_identical(tmp_path):
    frame = good_frame(users=tuple(range(50)), top_n=7)
    io.write_parquet(tmp_path / "a.parquet", frame)
    time.sleep(1.1)  # a timestamp in the file would differ now
    io.write_parquet(tmp_path / "b.parquet", frame)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_users_file_text_and_parquet(tmp_path):
    known = np.arange(10)
    text = tmp_path / "users.txt"
    text.write_text("user_id\n7\n\n2  # a comment\n# only a comment\n5\n")
    assert read_users_file(text, known).tolist() == [2, 5, 7]
    table = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": [9, 0]}).write_parquet(table)
    assert read_users_file(table, known).tolist() == [0, 9]


@pytest.mark.parametrize("content, fragments", [
    ("1\nx3\n", ["users.txt", "line 2", "'x3'", "not an integer"]),
    ("1\n42\n", ["users.txt", "line 2", "user_id 42", "not a user of the test split"]),
    ("1\n4\n1\n", ["users.txt", "line 3", "user_id 1", "repeats line 1"]),
    ("# nobody\n", ["users.txt", "lists no user ids"]),
])
def test_users_file_errors_name_the_file_and_line(tmp_path, content, fragments):
    path = tmp_path / "users.txt"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        read_users_file(path, np.arange(10))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_users_file_parquet_errors(tmp_path):
    path = tmp_path / "users.parquet"
    pl.DataFrame({"user": [1]}).write_parquet(path)
    with pytest.raises(ValueError, match=r"users.parquet: no column user_id"):
        read_users_file(path, np.arange(10))
    pl.DataFrame({"user_id": [1, 99]}).write_parquet(path)
    with pytest.raises(ValueError, match=r"users.parquet: row 1: user_id 99 is not a user"):
        read_users_file(path, np.arange(10))
    with pytest.raises(FileNotFoundError, match="candidates.users_file"):
        read_users_file(tmp_path / "absent.txt", np.arange(10))


def test_auto_dumps_the_validation_champion_and_says_why(tmp_path):
    write_tiny_data(tmp_path / "data")
    params = load_params(overrides=overrides(tmp_path, "candidates.method=auto"))
    with pytest.raises(FileNotFoundError, match=r"eval/leaderboard.json does not exist; run the evaluate stage"):
        plan_dump.fn(params)
    board = {"split": "valid", "rule": "highest validation recall@10, then ndcg@10", "champion": "sasrec",
             "users": 120, "runner_up": "tiger",
             "margin": {"recall@10": {"diff": 0.05, "ci_low": 0.01, "ci_high": 0.09, "p_value": 0.01}},
             "methods": [{"method": "sasrec", "metrics": {"recall@10": 0.3, "ndcg@10": 0.2}},
                         {"method": "tiger", "metrics": {"recall@10": 0.25, "ndcg@10": 0.1}}]}
    io.write_json(tmp_path / "data" / "tiny" / "eval" / "leaderboard.json", board)
    plan = plan_dump.fn(params)
    assert plan.method == "sasrec" and set(plan.model_sha256) == {"sasrec/model.safetensors", "sasrec/config.json"}
    assert plan.chosen_by["users"] == 120 and plan.chosen_by["leaderboard"] == {"sasrec": 0.3, "tiger": 0.25}
    assert plan.chosen_by["margin"]["recall@10"]["diff"] == 0.05
    named = plan_dump.fn(load_params(overrides=overrides(tmp_path, "candidates.method=sasrec")))
    assert named.method == "sasrec" and named.chosen_by is None
    board["champion"], board["methods"] = "tiger", board["methods"][::-1]
    io.write_json(tmp_path / "data" / "tiny" / "eval" / "leaderboard.json", board)
    assert plan_dump.fn(params).method == "tiger"


def test_plan_with_a_users_file_shards_only_those_users(tmp_path):
    write_tiny_data(tmp_path / "data")
    (tmp_path / "ids.txt").write_text("\n".join(str(u) for u in [30, 4, 100, 17, 5]) + "\n")
    params = load_params(overrides=overrides(tmp_path, f"candidates.users_file={tmp_path / 'ids.txt'}",
                                             "candidates.users_per_shard=2"))
    plan = plan_dump.fn(params)
    assert [s.users.tolist() for s in plan.shards] == [[4, 5], [17, 30], [100]]
    assert [s.rows.tolist() for s in plan.shards] == [[4, 5], [17, 30], [100]]  # test.parquet row u is user u
    everyone = plan_dump.fn(load_params(overrides=overrides(tmp_path)))
    assert sum(len(s.users) for s in everyone.shards) == N_USERS and len(everyone.shards) == N_USERS // 10
    assert everyone.fingerprint == plan.fingerprint  # the users are checked per shard, not in the fingerprint
    retrained = tmp_path / "data" / "tiny" / "backbone" / "model.safetensors"
    retrained.write_bytes(retrained.read_bytes()[:-4] + b"\0\0\0\0")
    assert plan_dump.fn(load_params(overrides=overrides(tmp_path))).fingerprint != plan.fingerprint


def test_sasrec_scores_are_sorted_and_agree_with_topk_items():
    torch.manual_seed(0)
    model = SASRec(30, sasrec_cfg(hidden=8, layers=1, dropout=0.0)).eval()
    histories = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [0, 29]]
    inst = make_instances(range(4), histories, [0] * 4, 10)
    items, scores = sasrec_top(model, inst, 6, batch_size=3, exclude_history=True)
    assert np.array_equal(items, topk_items(model, histories, 6, histories))
    assert (np.diff(scores, axis=1) <= 0).all()
    assert not any(set(row) & set(h) for row, h in zip(items.tolist(), histories))
    # 30 items, 6 in the history of row 2: its ranks 25..30 are padding, not history items
    items, scores = sasrec_top(model, inst, 30, batch_size=3, exclude_history=True)
    assert (items[2, 24:] == -1).all() and np.isneginf(scores[2, 24:]).all() and (items[2, :24] >= 0).all()


def _env(server: dict) -> dict:
    # One thread: the same float results in every process, and the busy cores stay free.
    return {**os.environ, "PREFECT_API_URL": server["url"], "PREFECT_HOME": str(server["home"]),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def killed_and_straight(tmp_path_factory, prefect_server):
    """The same dump twice: once straight through, once SIGKILLed after its first shard and rerun."""
    straight, killed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("killed")
    for root in (straight, killed):
        write_tiny_data(root / "data")
    cmd = [sys.executable, "-m", "flows.candidates"]

    def args(root: Path) -> list[str]:
        return [*cmd, *[a for o in overrides(root) for a in ("-S", o)]]

    t0 = time.perf_counter()
    done = subprocess.run(args(straight), cwd=PROJECT_ROOT, env=_env(prefect_server), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = killed / "data" / "tiny" / "candidates"
    proc = subprocess.Popen(args(killed), cwd=PROJECT_ROOT, env=_env(prefect_server),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "part-00000.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    on_kill = {p.name for p in out.iterdir()}
    rerun = subprocess.run(args(killed), cwd=PROJECT_ROOT, env=_env(prefect_server), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return {"straight": straight / "data" / "tiny" / "candidates", "killed": out, "on_kill": on_kill,
            "report": json.loads((killed / "reports" / "tiny" / "candidates.json").read_text()),
            "root": killed, "wall_s": time.perf_counter() - t0}


@pytest.mark.slow
def test_a_killed_dump_resumes_to_the_same_bytes(killed_and_straight):
    k = killed_and_straight
    assert "part-00000.json" in k["on_kill"] and MANIFEST not in k["on_kill"], "killed too late or too early"
    assert k["report"]["shards_reused"] >= 1  # the rerun kept what the killed run finished
    files = sorted(p.name for p in k["straight"].glob("part-*"))
    assert len([f for f in files if f.endswith(".parquet")]) == N_USERS // 10
    assert files == sorted(p.name for p in k["killed"].glob("part-*"))
    assert not list(k["killed"].glob(".*.tmp"))
    for name in files:
        assert (k["straight"] / name).read_bytes() == (k["killed"] / name).read_bytes(), name
    a, b = (json.loads((k[d] / MANIFEST).read_text()) for d in ("straight", "killed"))
    assert a["shards"] == b["shards"] and a["model_sha256"] == b["model_sha256"]
    for shard in b["shards"]:
        assert _sha(k["killed"] / shard["file"]) == shard["sha256"]
    assert b["rows"] == N_USERS * 5 and b["top_n"] == 5 and b["method"] == "tiger"
    frame = pl.read_parquet(k["killed"] / "*.parquet")
    assert frame.height == N_USERS * 5 and frame["user_id"].n_unique() == N_USERS


@pytest.mark.slow
def test_a_shard_of_another_model_or_with_other_bytes_is_not_kept(killed_and_straight):
    k = killed_and_straight
    plan = plan_dump.fn(load_params(overrides=overrides(k["root"])))
    shard = plan.shards[1]
    assert current_shard(k["killed"], shard, plan.fingerprint)["sha256"] == _sha(k["killed"] / "part-00001.parquet")
    assert current_shard(k["killed"], shard, "another model") is None
    assert current_shard(k["killed"], plan.shards[2], plan.fingerprint) is not None
    assert current_shard(k["killed"], plan.shards[2]._replace(users=shard.users), plan.fingerprint) is None
    path = k["killed"] / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert current_shard(k["killed"], shard, plan.fingerprint) is None


@pytest.mark.slow
def test_a_dump_sharded_over_two_dask_workers_equals_the_single_process_dump(killed_and_straight, tmp_path,
                                                                              prefect_server):
    """prefect-dask: a local cluster of 2 worker processes decodes the shards; same bytes, same manifest."""
    write_tiny_data(tmp_path / "data")
    args = [sys.executable, "-m", "flows.candidates",
            *[a for o in [*overrides(tmp_path), "candidates.workers=2", "candidates.threads=1"] for a in ("-S", o)]]
    done = subprocess.run(args, cwd=PROJECT_ROOT, env=_env(prefect_server), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "data" / "tiny" / "candidates"
    report = json.loads((tmp_path / "reports" / "tiny" / "candidates.json").read_text())
    assert report["workers"] == 2 and report["shards_reused"] == 0
    files = sorted(p.name for p in killed_and_straight["straight"].glob("part-*.parquet"))
    assert files == sorted(p.name for p in out.glob("part-*.parquet")) and len(files) == N_USERS // 10
    for name in files:
        assert (out / name).read_bytes() == (killed_and_straight["straight"] / name).read_bytes(), name
    a, b = (json.loads((d / MANIFEST).read_text()) for d in (killed_and_straight["straight"], out))
    assert a["shards"] == b["shards"] and a["fingerprint"] == b["fingerprint"]
    # one completed Prefect task run per shard, read back from the server
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server["url"]}), get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="dump_shard")))
    assert sum(r.state is not None and r.state.is_completed() for r in runs) >= len(files)
