"""One tiny end-to-end `dvc repro` in a copy of the project, against a real Prefect server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
import yaml

from tests.flows.conftest import PROJECT_ROOT, VENV_BIN

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
    return {"root": root, "counts": tiny_project["counts"], "dvc": dvc, "first": first, "env": env}


def test_repro_ingests_and_reports_counts_from_the_store(project):
    rep = json.loads((project["root"] / "reports" / "tiny" / "ingest.json").read_text())
    assert {k: rep[k] for k in ("users", "items", "interactions")} == project["counts"]


def test_repro_gives_unique_ids_and_test_metrics(project):
    tok = json.loads((project["root"] / "reports" / "tiny" / "tokenize.json").read_text())
    assert tok["n_distinct_ids"] == tok["n_items"] == project["counts"]["items"]
    metrics = json.loads((project["root"] / "reports" / "tiny" / "metrics.json").read_text())
    evaluated = yaml.safe_load((project["root"] / "params.yaml").read_text())["evaluate"]["methods"]
    assert {"tiger", "tiger_cf", "sasrec", "gc_sft", "grc_sft", "grc_rl", "tiger_rl", "vstar"} <= set(evaluated)
    assert set(metrics["methods"]) == set(evaluated)
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
    # cross-fitted drafts (mine.crossfit_folds 2): every mined instance came from the one fold
    # backbone that did not train on its user, and the two fold backbones split the training users
    cf = mine["crossfit"]
    assert cf["folds"] == 2 and len(cf["fold_backbones"]) == 2
    assert sum(f["mined_instances"] for f in cf["fold_backbones"]) == mine["train"]["rows"] // 4
    import polars as pl

    from tasks.mine import user_folds

    train = pl.read_parquet(project["root"] / "data" / "tiny" / "splits" / "train.parquet")
    folds = user_folds(train["user_id"].to_numpy(), 2, seed=2026)
    assert [f["train_instances"] for f in cf["fold_backbones"]] == [int((folds != 0).sum()), int((folds != 1).sum())]


def test_repro_dumps_candidates_that_duckdb_and_polars_read(project):
    import duckdb
    import polars as pl

    out = project["root"] / "data" / "tiny" / "candidates"
    manifest = json.loads((out / "manifest.json").read_text())
    users, top_n = project["counts"]["users"], 10  # candidates.top_n in TINY_OVERRIDES
    # candidates.method auto: the dump is the validation champion of evaluate's leaderboard
    board = json.loads((project["root"] / "data" / "tiny" / "eval" / "leaderboard.json").read_text())
    assert manifest["method"] == board["champion"] and manifest["top_n"] == top_n
    # evaluate.champion_default: the champion is the default unless the first row beat it significantly
    default = board["default"]
    assert board["champion"] == (board["methods"][0]["method"] if default["replaced"] else default["method"])
    assert manifest["chosen_by"]["default"] == default
    assert manifest["chosen_by"]["users"] == board["users"] == users
    assert [m["metrics"]["recall@10"] for m in board["methods"]] == sorted(
        (m["metrics"]["recall@10"] for m in board["methods"]), reverse=True)
    metrics = json.loads((project["root"] / "reports" / "tiny" / "metrics.json").read_text())
    assert metrics["leaderboard"] == board
    # evaluate.cf_weights: tiger_cf ranked validation at each weight; its row is the best weight's
    tuned = board["tiger_cf_weight"]
    grid = yaml.safe_load((project["root"] / "params.yaml").read_text())["evaluate"]["cf_weights"]
    assert tuned["weights"] == [float(w) for w in grid] and len(grid) > 1 and len(tuned["valid"]) == len(grid)
    best = max(tuned["valid"], key=lambda r: (r["recall@10"], r["ndcg@10"], -r["weight"]))
    assert tuned["chosen"] == best["weight"]
    [row] = [m for m in board["methods"] if m["method"] == "tiger_cf"]
    assert row["metrics"]["recall@10"] == pytest.approx(best["recall@10"], abs=1e-12)
    assert metrics["methods"]["tiger_cf"]["cf_weight"] == tuned["chosen"]
    assert manifest["cf_weight"] == (tuned["chosen"] if manifest["method"] == "tiger_cf" else None)
    assert [s["users"] for s in manifest["shards"]] == [16, 16, users - 32]  # users_per_shard=16
    [(rows, n_users, ranks_ok)] = duckdb.sql(
        f"SELECT count(*), count(DISTINCT user_id), bool_and(rank BETWEEN 1 AND {top_n}) "
        f"FROM '{out}/*.parquet'").fetchall()
    assert (rows, n_users, ranks_ok) == (users * top_n, users, True)
    frame = pl.read_parquet(out / "*.parquet")
    assert frame.schema == {"user_id": pl.Int64, "rank": pl.Int32, "item_id": pl.Int64, "score": pl.Float32}
    assert frame.height == manifest["rows"] == users * top_n
    assert frame.group_by("user_id").agg(pl.col("item_id").n_unique())["item_id"].min() == top_n


def test_dvc_metrics_and_plots_show_every_methods_results(project):
    shown = project["dvc"]("metrics", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    [workspace] = json.loads(shown.stdout).values()  # keyed "workspace", or "" before the first commit
    metrics = workspace["data"]["reports/tiny/metrics.json"]["data"]["methods"]
    evaluated = set(yaml.safe_load((project["root"] / "params.yaml").read_text())["evaluate"]["methods"])
    assert set(metrics) == evaluated
    plots = project["dvc"]("plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    data = json.loads(plots.stdout)["data"]
    rows = data["recall_at_k"][0]["content"]["data"]["values"]
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["dvc_inferred_y_value"] != "":  # a method not evaluated has an empty column
            curves.setdefault(r["field"], []).append((int(r["k"]), float(r["dvc_inferred_y_value"])))
    assert set(curves) == evaluated
    for name, pts in curves.items():
        ys = [y for _, y in sorted(pts)]
        assert ys == sorted(ys) and 0.0 <= ys[0] <= ys[-1] <= 1.0, name  # Recall@K never falls with K
        assert dict(pts)[10] == pytest.approx(metrics[name]["metrics"]["recall@10"], abs=1e-6)
    assert any("backbone_log.csv" in key for key in data)  # the training curves too


def test_every_methods_bundle_alone_ranks_as_evaluate_did(project, tmp_path):
    """What a published version bundles for a method (tasks/publish.py bundle_files, from
    METHOD_MODELS) is all its ranking reads: scored from a folder holding only those files, each
    evaluated method gives evaluate's own validation ranks, user for user (tiger_cf at the weight
    evaluate chose on validation, as its dump records it)."""
    import numpy as np
    import polars as pl

    from tasks.params import load_params
    from tasks.artifacts import tiger_cf_weight
    from tasks.publish import bundle_files, score_published

    root = project["root"]
    params = load_params(root / "params.yaml", [f"data.data_dir={json.dumps(str(root / 'data'))}",
                                                f"data.reports_dir={json.dumps(str(root / 'reports'))}"])
    out = params.dataset_dir()
    for method in params.evaluate.methods:
        bundle = tmp_path / method
        for rel in bundle_files(method):
            (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / rel, bundle / rel)
        w = tiger_cf_weight(out, params.evaluate.cf_weights) if method == "tiger_cf" else 0.0
        got = score_published.fn(params, bundle, method, w).sort("user_id")
        want = pl.read_parquet(out / "eval" / "valid" / f"{method}.parquet").sort("user_id")
        assert got["user_id"].to_list() == want["user_id"].to_list(), method
        assert np.array_equal(got["rank"].to_numpy(), want["rank"].to_numpy()), method


def test_vstar_ved_ranker_decodes_the_stage_policy_with_its_recorded_value(project):
    """`vstar_ved` (what evaluate and candidates call) is the stage's V-STAR policy decoded by VED
    under the value source the stage recorded (`ved_value`: V_phi + ved_cf_weight V_cf by default):
    its lists equal an explicit VED decode with that source, user for user. Every value source gives
    items that exist, are distinct and are outside the user's history; SASRec's V_cf changes them."""
    import numpy as np

    from grc_core.config import VEDConfig
    from grc_core.ved import rank_with_ved
    from tasks.artifacts import (item_index, load_backbone, load_split, load_value_head, model_dir, ved_value,
                                 vstar_ved_ranker)
    from tasks.params import load_params

    root = project["root"]
    params = load_params(root / "params.yaml", [f"data.data_dir={json.dumps(str(root / 'data'))}"])
    out = params.dataset_dir()
    table, trie, _, _ = item_index(out, params.dataset.attributes, "cpu")
    inst = load_split(out, "test", params.data.max_history)
    head, meta = load_value_head(out)
    assert (meta["ved_value"], meta["ved_cf_weight"]) == (params.vstar.ved_value, params.vstar.ved_cf_weight)
    got, _ = vstar_ved_ranker(out, table, trie, "cpu", 16, True)(inst)
    policy = load_backbone(out, "cpu", model_dir(out, "vstar") / "model.safetensors")
    lists, n_items = {}, table.codes.shape[0]
    for source, w in (("learned", 0.0), ("cf", 0.0), ("sum", float(meta["ved_cf_weight"]))):
        lists[source], _ = rank_with_ved(policy, inst, table, trie, VEDConfig(**meta["ved_test"]),
                                         ved_value(head, out, trie, source, w), 16, exclude_history=True)
        for row, hist in zip(lists[source], inst.history.numpy()):
            items = row[row >= 0]
            assert len(items) > 0 and items.max() < n_items, source
            assert len(set(items.tolist())) == len(items), source
            assert not set(items.tolist()) & set(hist[hist >= 0].tolist()), source
    assert np.array_equal(got, lists[meta["ved_value"]])
    assert not np.array_equal(lists["learned"], lists["cf"])


def test_grc_drafts_by_ved_rank_through_the_stage_ranker_and_its_benchmark(project, monkeypatch, tmp_path):
    """`evaluate.grc_drafts: ved` (what evaluate and candidates call through `load_ranker`): GRC-SFT's
    two-pass lists with VED's drafts equal an explicit `rank_with_grc` under that config; they hold
    real, distinct items outside the history and differ from the beam-draft lists. benchmarks.grc_drafts
    ranks both sources on the trained run and records its validation choice."""
    from dataclasses import replace

    import numpy as np

    import benchmarks.common
    from benchmarks import grc_drafts
    from grc_core.evaluation import rank_with_grc
    from tasks.artifacts import (decode_config, item_index, load_baseline, load_grc, load_ranker, load_split,
                                 sasrec_log_probs)
    from tasks.params import load_params

    root = project["root"]
    data_dir = f"data.data_dir={json.dumps(str(root / 'data'))}"
    params = load_params(root / "params.yaml", [data_dir])
    out, ev = params.dataset_dir(), params.evaluate
    table, trie, _, _ = item_index(out, params.dataset.attributes, "cpu")
    inst = load_split(out, "test", params.data.max_history)
    ranked = {}
    for source in ("beam", "ved"):
        decode = decode_config(replace(ev, grc_drafts=source), ev.beam, params.vstar.ved_test)
        assert (decode.draft_ved is not None) == (source == "ved")
        ranked[source], _ = load_ranker("grc_sft", out, params.dataset.attributes, "cpu", decode, 16, True,
                                        0.0)(inst)
    decode = decode_config(replace(ev, grc_drafts="ved"), ev.beam, params.vstar.ved_test)
    direct, _ = rank_with_grc(load_grc(out, "grc_sft"), inst, table, trie, decode, 16, exclude_history=True,
                              item_logp=sasrec_log_probs(load_baseline(out)))
    assert np.array_equal(ranked["ved"], direct)
    for row, hist in zip(ranked["ved"], inst.history.numpy()):
        items = row[row >= 0]
        assert len(items) > 0 and items.max() < table.codes.shape[0]
        assert len(set(items.tolist())) == len(items)
        assert not set(items.tolist()) & set(hist[hist >= 0].tolist())
    assert not np.array_equal(ranked["ved"], ranked["beam"])
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path)
    monkeypatch.setattr(grc_drafts, "load_params", lambda overrides: load_params(root / "params.yaml", overrides))
    report = grc_drafts.main(["-S", data_dir, "-S", f"data.reports_dir={json.dumps(str(root / 'reports'))}",
                              "--valid-users", "12", "--test-users", "12", "--bootstrap", "50"])
    got = report["methods"]["grc_sft"]
    assert got["chosen"] in ("beam", "ved") and got["test"]["users"] == got["valid"]["users"] == 12
    assert (tmp_path / f"grc_drafts_{params.data.dataset}.json").exists()


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
    args = [str(VENV_BIN / "python"), "-m", "flows.grpo", "-S", "grpo.loop.iterations=6", "-S", "grpo.loop.eval_every=2"]

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


def _stage_inputs(root, data_dir: str, *dirs: str):
    """A second data dir holding copies of the tiny project's items and the given stage outputs."""
    src, dst = root / "data" / "tiny", root / data_dir / "tiny"
    dst.mkdir(parents=True)
    for name in dirs:
        shutil.copytree(src / name, dst / name)
    shutil.copy(src / "items.parquet", dst / "items.parquet")
    return src, dst


def test_torchrun_backbone_on_two_processes_matches_the_single_process_stage(project):
    """`torchrun -m tasks.ddp backbone` with 2 gloo processes and the same global batch ends at the
    weights the single-process stage (`dvc repro` above) reached, up to float summation order."""
    from safetensors.torch import load_file

    root = project["root"]
    src, dst = _stage_inputs(root, "data_ddp", "splits", "tokenizer", "sasrec")  # the stage reads SASRec (cf_distill)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "tasks.ddp",
                          "backbone", "-S", "data.data_dir=data_ddp", "-S", "data.reports_dir=reports_ddp",
                          "-S", "backbone.train.threads=1"], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((root / "reports_ddp" / "tiny" / "backbone.json").read_text())
    single = json.loads((root / "reports" / "tiny" / "backbone.json").read_text())
    assert report["world_size"] == 2 and report["best_epoch"] == single["best_epoch"]
    a = load_file(str(src / "backbone" / "model.safetensors"))
    b = load_file(str(dst / "backbone" / "model.safetensors"))
    init = max(float(v.abs().max()) for v in a.values())
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4 * max(1.0, init)


def test_mine_sharded_over_two_dask_workers_gives_the_same_labels(project):
    """`mine.workers=2`: the beam searches (stage backbone and cross-fitted folds) run as Prefect
    tasks on a local Dask cluster; the labels equal a single-process run's with the same threads."""
    import polars as pl

    root = project["root"]
    outs = {}
    for workers in (1, 2):
        _, dst = _stage_inputs(root, f"data_mine{workers}", "splits", "tokenizer", "backbone")
        run = subprocess.run([str(VENV_BIN / "python"), "-m", "flows.mine", "-S", f"data.data_dir=data_mine{workers}",
                              "-S", f"data.reports_dir=reports_mine{workers}", "-S", f"mine.workers={workers}",
                              "-S", "mine.threads=1", "-S", "mine.shard_batches=1", "-S", "backbone.train.threads=1"],
                             cwd=root, env={**project["env"], "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        outs[workers] = {s: pl.read_parquet(dst / "mine" / f"{s}.parquet") for s in ("train", "valid")}
        report = json.loads((root / f"reports_mine{workers}" / "tiny" / "mine.json").read_text())
        assert report["workers"] == workers
    for split in ("train", "valid"):
        assert outs[1][split].height > 0
        assert outs[1][split].equals(outs[2][split]), split


def test_torchrun_grpo_on_two_processes_matches_one_process(project):
    """GRPO under DDP: both ranks sample the same episodes, each takes half the users' loss; after
    3 iterations (6 optimiser steps) the policy equals the one-process policy up to float order."""
    from safetensors.torch import load_file

    root = project["root"]
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    weights = {}
    for world in (1, 2):
        src, dst = _stage_inputs(root, f"data_grpo{world}", "splits", "tokenizer", "sft")
        launch = ([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "tasks.ddp"] if world == 2
                  else [str(VENV_BIN / "python"), "-m", "tasks.ddp"])
        run = subprocess.run([*launch, "grpo", "-S", f"data.data_dir=data_grpo{world}", "-S",
                              f"data.reports_dir=reports_grpo{world}", "-S", "grpo.threads=1", "-S", "grpo.loop.lr=0.00005"],
                             cwd=root, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert json.loads((root / f"reports_grpo{world}" / "tiny" / "grpo.json").read_text())["world_size"] == world
        weights[world] = load_file(str(dst / "grpo" / "ckpt" / "last" / "model.safetensors"))
    start = load_file(str(src / "sft" / "grc" / "model.safetensors"))
    moved = max(float((weights[1][k] - start[k]).abs().max()) for k in start)
    diff = max(float((weights[1][k] - weights[2][k]).abs().max()) for k in start)
    assert moved > 1e-4 and diff < 1e-5, (moved, diff)  # at lr 5e-5 each step moves weights ~1e-4


def test_offloaded_backbone_and_grpo_runs_resume_as_the_stages_outputs(project):
    """benchmarks.offload_*: export here, train in another process (the GPU worker's role, on CPU
    here), unpack; the stage then resumes from the unpacked checkpoint, trains nothing, and keeps
    exactly the offloaded best weights."""
    from safetensors.torch import load_file

    root, env = project["root"], project["env"]
    shutil.copytree(PROJECT_ROOT / "benchmarks", root / "benchmarks", dirs_exist_ok=True,  # evaluate made results/
                    ignore=shutil.ignore_patterns("__pycache__", "results", "*.md"))
    _stage_inputs(root, "data_off", "splits", "tokenizer", "sasrec", "sft")
    common = ["-S", "data.data_dir=data_off", "-S", "data.reports_dir=reports_off"]
    py = str(VENV_BIN / "python")

    def run(*args: str) -> None:
        done = subprocess.run([py, "-m", *args], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    stages = {"backbone": (["-S", "backbone.train.epochs=3"], "backbone"),
              "grpo": (["-S", "grpo.loop.iterations=4"], "grpo")}
    for stage, (extra, out) in stages.items():
        tool = f"benchmarks.offload_{stage}"
        run(tool, "export", "--name", stage, "--data", f"d_{stage}", "--out", "off", *common, *extra)
        run(tool, "train", "--name", stage, "--src", "off", "--out", "off_out", "--device", "cpu",
            *(["--keep-weights"] if stage == "grpo" else []))
        run(tool, "unpack", "--tar", f"off_out/{stage}.tar", "--name", stage, "--src", "off")
        ckpt = root / "data_off" / "tiny" / out / "ckpt"
        offloaded = load_file(str(ckpt / "best" / "model.safetensors"))
        assert json.loads((ckpt / "offload.json").read_text())["fingerprint"]
        state = (ckpt / "last" / "trainer.json").read_bytes()  # timings: a re-run would rewrite them
        run(f"flows.{stage}", *common, *extra)
        assert (ckpt / "last" / "trainer.json").read_bytes() == state, f"the {stage} stage trained again"
        report = json.loads((root / "reports_off" / "tiny" / f"{stage}.json").read_text())
        kept = load_file(str(root / "data_off" / "tiny" / out / "model.safetensors"))
        assert kept.keys() == offloaded.keys() and all(torch.equal(kept[k], offloaded[k]) for k in kept)
        if stage == "backbone":
            assert report["epochs_run"] == 3
        else:
            assert report["iterations"] == 4 and report["episodes_per_s_this_run"] == 0
    grpo = json.loads((root / "off_out" / "grpo.json").read_text())
    assert set(grpo["test"]) == {"best", "last"} and len(grpo["test_ranks"]["best"]) == len(grpo["test_users"])


def test_dvc_exp_run_with_a_grpo_param_reruns_grpo_and_after_only(project):
    """`dvc exp run -S grpo.rollout.group_size=2`: an experiment from the committed pipeline that re-runs
    grpo and what depends on it, nothing upstream (last in this module: it changes outputs)."""
    root, env = project["root"], project["env"]
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "add", "-A"], cwd=root, check=True, env=env, capture_output=True)
    subprocess.run([*git, "commit", "-q", "-m", "baseline"], cwd=root, check=True, env=env, capture_output=True)
    run = project["dvc"]("exp", "run", "-S", "grpo.rollout.group_size=2")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    ran = {line.split("'")[1] for line in run.stdout.splitlines() if line.startswith("Running stage '")}
    # grpo re-runs; evaluate and candidates only if the kept GRPO weights changed (DVC compares hashes)
    assert "grpo" in ran and ran <= {"grpo", "evaluate", "candidates"}, run.stdout[-2000:]
    exps = project["dvc"]("exp", "show", "--json")
    assert exps.returncode == 0, exps.stderr

    def group_sizes(node) -> list:
        if isinstance(node, dict):
            grpo = node.get("grpo")
            rollout = grpo.get("rollout") if isinstance(grpo, dict) else None
            here = [rollout["group_size"]] if isinstance(rollout, dict) and "group_size" in rollout else []
            return here + [v for child in node.values() for v in group_sizes(child)]
        return [v for child in node for v in group_sizes(child)] if isinstance(node, list) else []

    sizes = group_sizes(json.loads(exps.stdout))
    assert 2 in sizes and 4 in sizes  # the experiment's value and the baseline's (TINY_OVERRIDES)
