"""One tiny end-to-end `dvc repro` in a copy of the project, against a real Prefect server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
import yaml

from tests.flows.conftest import VENV_BIN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tiny_project):
    root, env = tiny_project["root"], tiny_project["env"]
    for cmd in (["git", "init", "-q"], [str(VENV_BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=env)

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True)

    first = dvc("repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return {"root": root, "counts": tiny_project["counts"], "dvc": dvc, "first": first}


def test_repro_ingests_and_reports_counts_from_the_store(project):
    rep = json.loads((project["root"] / "reports" / "tiny" / "ingest.json").read_text())
    assert {k: rep[k] for k in ("users", "items", "interactions")} == project["counts"]


def test_repro_gives_unique_ids_and_test_metrics(project):
    tok = json.loads((project["root"] / "reports" / "tiny" / "tokenize.json").read_text())
    assert tok["n_distinct_ids"] == tok["n_items"] == project["counts"]["items"]
    metrics = json.loads((project["root"] / "reports" / "tiny" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"tiger", "sasrec", "gc_sft", "grc_sft", "grc_rl"}
    for method in metrics["methods"].values():
        assert method["users"] == project["counts"]["users"]
        m = method["metrics"]
        assert set(m) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}  # beam 20: no Recall@100/200
        assert 0.0 <= m["ndcg@5"] <= m["recall@5"] <= m["recall@10"] <= 1.0
    vs = metrics["methods"]["sasrec"]["vs_tiger"]
    assert set(vs) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "base_metrics", "users"}
    assert vs["users"] == project["counts"]["users"]
    assert vs["base_metrics"]["recall@10"] == pytest.approx(metrics["methods"]["tiger"]["metrics"]["recall@10"])
    refl = metrics["methods"]["grc_sft"]["reflection"]
    assert 0.0 <= refl["acc_loc@5"] <= 1.0 and 0.0 <= refl["acc_cat@10"] <= 1.0
    assert "acc_loc@5" not in metrics["methods"]["gc_sft"]["reflection"]
    mine = json.loads((project["root"] / "reports" / "tiny" / "mine.json").read_text())
    assert mine["train"]["rows"] % 4 == 0 and abs(sum(mine["valid"]["r_loc_share"].values()) - 1) < 1e-9


def test_repro_dumps_candidates_that_duckdb_and_polars_read(project):
    import duckdb
    import polars as pl

    out = project["root"] / "data" / "tiny" / "candidates"
    manifest = json.loads((out / "manifest.json").read_text())
    users, top_n = project["counts"]["users"], 10  # candidates.top_n in TINY_OVERRIDES
    assert manifest["method"] == "grc_rl" and manifest["top_n"] == top_n
    assert [s["users"] for s in manifest["shards"]] == [16, 16, users - 32]  # users_per_shard=16
    [(rows, n_users, ranks_ok)] = duckdb.sql(
        f"SELECT count(*), count(DISTINCT user_id), bool_and(rank BETWEEN 1 AND {top_n}) "
        f"FROM '{out}/*.parquet'").fetchall()
    assert (rows, n_users, ranks_ok) == (users * top_n, users, True)
    frame = pl.read_parquet(out / "*.parquet")
    assert frame.schema == {"user_id": pl.Int64, "rank": pl.Int32, "item_id": pl.Int64, "score": pl.Float32}
    assert frame.height == manifest["rows"] == users * top_n
    assert frame.group_by("user_id").agg(pl.col("item_id").n_unique())["item_id"].min() == top_n


def test_second_repro_skips_every_stage(project):
    again = project["dvc"]("repro")
    assert again.returncode == 0, again.stderr
    assert "Data and pipelines are up to date" in again.stdout


def test_changing_an_evaluate_param_reruns_only_evaluate(project):
    root = project["root"]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["evaluate"]["bootstrap"] = 200
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    status = project["dvc"]("status")
    assert "evaluate" in status.stdout
    for stage in ("ingest", "embed", "tokenize", "backbone", "sasrec", "mine", "sft", "grpo"):
        assert f"{stage}:" not in status.stdout


def test_grpo_killed_mid_run_resumes_to_the_same_weights(project, prefect_server):
    """A real SIGKILL after the first checkpoint; the rerun must end where an uninterrupted run ends."""
    import signal
    import time

    from safetensors.torch import load_file

    root = project["root"]
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PREFECT_API_URL": prefect_server["url"],
           "PREFECT_HOME": str(prefect_server["home"])}
    work = root / "data" / "tiny" / "grpo"
    args = [str(VENV_BIN / "python"), "-m", "flows.grpo", "-S", "grpo.iterations=6", "-S", "grpo.eval_every=2"]

    def run_clean() -> dict:
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(args, cwd=root, env=env, check=True, capture_output=True)
        return load_file(str(work / "ckpt" / "last" / "model.safetensors"))

    straight = run_clean()
    shutil.rmtree(work, ignore_errors=True)
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer = work / "ckpt" / "last" / "trainer.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if trainer.exists() and json.loads(trainer.read_text())["state"]["step"] >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(trainer.read_text())["state"]["step"] < 6, "the run finished before it could be killed"
    subprocess.run(args, cwd=root, env=env, check=True, capture_output=True)
    resumed = load_file(str(work / "ckpt" / "last" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
