"""The training stages' task bodies through `.fn()`, with no Prefect server, on a tiny project.

The module builds one tiny project in a tmp dir: the synthetic LC-Rec dataset of the flow tests
goes through the ingest and tokenize task bodies in the flows' order (the embed stage's
encoder is replaced by clustered random unit vectors written in its format), then backbone,
SASRec, mining, both SFT variants and GRPO are trained once each. The tests check what every
stage reports against what it wrote: the CSV log, the published weights and their config, and
the validation metric those weights reproduce.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from grc_core.evaluation import rank_with_backbone, rank_with_grc, ranking_metrics
from tasks import io
from tasks.artifacts import item_index, load_backbone, load_baseline, load_grc, load_rows, load_split, selection_decode
from tasks.backbone import train_backbone
from tasks.embed import gate_embeddings
from tasks.ingest import (build_splits, commit_and_publish, fetch_source, gate_raw, gate_splits, read_source,
                          source_hash, stage_tables, with_buckets)
from tasks.grpo import train_grpo
from tasks.mine import mine_labels
from tasks.params import load_params
from tasks.sasrec import train_baseline
from tasks.sft import train_sft
from tasks.tokenize import gate_ids, save_tokenizer, tokenize_items
from tests.flows.conftest import TINY_OVERRIDES, write_synthetic_lcrec

pytestmark = pytest.mark.slow

# The flow tests' tiny settings, with a narrower backbone, fewer RQ-VAE epochs, one-epoch fold
# backbones and larger SFT batches, so the whole chain trains in about 30 CPU seconds.
OVERRIDES = [*TINY_OVERRIDES, "backbone.model.d_model=32", "backbone.model.d_ff=64", "backbone.model.n_heads=2",
             "tokenize.rqvae.epochs=5", "mine.crossfit_epochs=1", "sft.train.batch_size=32"]
TOP, SAMPLED = 2, 2  # mine.top, mine.sampled in TINY_OVERRIDES


def body(fn):
    """The plain function under a Prefect task (a helper that is not a task is returned as is)."""
    return getattr(fn, "fn", fn)


def tiny_overrides(root: Path, *extra: str, source: Path | None = None) -> list[str]:
    """The `-S` overrides of `make_tiny_params`."""
    spec = {"format": "lcrec", "path": str(source or root / "source"), "prefix": "Tiny", "attributes": ["category", "brand"]}
    return [f"data.data_dir={json.dumps(str(root / 'data'))}", f"data.reports_dir={json.dumps(str(root / 'reports'))}",
            "data.dataset=tiny", f"datasets.tiny={json.dumps(spec)}", *OVERRIDES, *extra]


def make_tiny_params(root: Path, *extra: str, source: Path | None = None):
    """Params with outputs under `root` and dataset `tiny` read from `source` (default root/source)."""
    return load_params(overrides=tiny_overrides(root, *extra, source=source))


def backbone_inputs_copy(project, root: Path, *extra: str):
    """Tiny params under `root` with `extra` overrides, and the project's splits, tokenizer, SASRec
    and items copied there: what a backbone trained under other settings reads. Returns (params,
    the project's dataset dir, the copy's)."""
    src = project["params"].dataset_dir()
    params = make_tiny_params(root, *extra, source=project["root"] / "source")
    dst = params.dataset_dir()
    for name in ("splits", "tokenizer", "sasrec", "sasrec_ensemble"):
        shutil.copytree(src / name, dst / name)
    shutil.copy(src / "items.parquet", dst / "items.parquet")
    return params, src, dst


def ingest(params) -> None:
    """The task calls of flows/ingest.py for an in-memory (LC-Rec) source."""
    spec, out_dir, report_dir = params.dataset, params.dataset_dir(), params.reports_dir()
    body(fetch_source)(spec)
    src_hash = body(source_hash)(spec, params)
    raw = body(read_source)(spec)
    items = body(with_buckets)(raw.items)
    splits = body(build_splits)(raw.interactions, params.data.max_history)
    body(gate_raw)(items, raw.interactions, params, report_dir)
    body(gate_splits)(splits, items.height, raw.interactions["user_id"].n_unique(), params.data.max_history, report_dir)
    version = body(stage_tables)(out_dir, items, splits)
    body(commit_and_publish)(out_dir, out_dir / "interactions.duckdb", version, items, raw.interactions, src_hash,
                             raw.source_files)


def fake_embed(params) -> None:
    """embeddings.safetensors as flows/embed.py writes it, from unit vectors clustered by category
    (the tokenizer then has structure to find) instead of the sentence encoder."""
    out_dir = params.dataset_dir()
    items = pl.read_parquet(out_dir / "items.parquet").sort("item_id")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(int(items["category_bucket"].max()) + 1, 384))
    emb = centres[items["category_bucket"].to_numpy()] + 0.3 * rng.normal(size=(items.height, 384))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)  # (N, 384)
    body(gate_embeddings)(emb, items.height, params.reports_dir())
    io.write_safetensors(out_dir / "embeddings.safetensors", {"embeddings": emb},
                         {"model": params.embed.model, "skipped": "False"})


def tokenize(params) -> None:
    """The task calls of flows/tokenize.py."""
    out_dir, cfg = params.dataset_dir(), params.tokenize
    items = pl.read_parquet(out_dir / "items.parquet")
    embeddings = io.read_safetensors(out_dir / "embeddings.safetensors")[0]["embeddings"]
    tok = body(tokenize_items)(items, embeddings, cfg, params.id_source)
    body(gate_ids)(tok.ids, tok.level_sizes, items.height, params.reports_dir())
    body(save_tokenizer)(out_dir / "tokenizer", tok, {"source": params.id_source, "method": cfg.method,
                                                      "base_levels": int(tok.codes.shape[1])})


def read_log(path: Path) -> list[dict]:
    """A training log's rows, numbers parsed (the CSV holds repr(float), so they round-trip exactly)."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


def best_in_log(rows: list[dict], step: str) -> tuple[float, int]:
    """The best valid_recall@10 of a log and the first row reaching it (selection keeps the first:
    a later tie is not an improvement)."""
    scored = [r for r in rows if r.get("valid_recall@10") is not None]
    top = max(r["valid_recall@10"] for r in scored)
    return top, int(next(r[step] for r in scored if r["valid_recall@10"] == top))


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def valid_instances(params):
    return load_split(params.dataset_dir(), "valid", params.data.max_history)  # valid_users=0: all of them


def grc_valid_recall(params, method: str, beam: int, batch_size: int) -> float:
    out_dir = params.dataset_dir()
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    valid = valid_instances(params)
    ranked, _ = rank_with_grc(load_grc(out_dir, method), valid, table, trie,
                              selection_decode(beam, params.evaluate.rank_rule, params.evaluate.verify_gamma), batch_size,
                              exclude_history=params.data.exclude_history)
    return ranking_metrics(ranked, valid.target.numpy(), ks=(5, 10, 20))[0]["recall@10"]


# --- the tiny project, built once --------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    counts = write_synthetic_lcrec(root / "source")
    params = make_tiny_params(root)
    ingest(params)
    fake_embed(params)
    tokenize(params)
    return {"root": root, "params": params, "counts": counts}


@pytest.fixture(scope="module")
def backbone(project, sasrec):  # the stage's fingerprint reads SASRec (backbone.cf_distill)
    params = project["params"]
    result = body(train_backbone)(params)
    work, log = params.dataset_dir() / "backbone", params.reports_dir() / "backbone_log.csv"
    return {"result": result, "model": (work / "model.safetensors").read_bytes(), "log": log.read_text(),
            "trainer": json.loads((work / "ckpt" / "last" / "trainer.json").read_text())}


@pytest.fixture(scope="module")
def mined(project, backbone):
    return body(mine_labels)(project["params"])


@pytest.fixture(scope="module")
def sft(project, mined):
    return {v: body(train_sft)(project["params"], v) for v in ("grc", "gc")}


@pytest.fixture(scope="module")
def grpo(project, sft):
    return body(train_grpo)(project["params"])


# --- backbone -----------------------------------------------------------------------------------


def test_backbone_reports_its_log_and_publishes_the_best_checkpoint(project, backbone):
    params, result = project["params"], backbone["result"]
    out_dir = params.dataset_dir()
    rows = read_log(params.reports_dir() / "backbone_log.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # backbone.train.epochs=2, eval_every=1
    assert result["epochs_run"] == 2
    top, epoch = best_in_log(rows, "epoch")
    assert result["best_valid_recall@10"] == top
    assert result["best_epoch"] == epoch
    train_rows = pl.read_parquet(out_dir / "splits" / "train.parquet").height
    assert result["train_instances"] == train_rows
    # 40 users of 5..8 interactions: n - 3 training rows each, so 80..200 in all
    assert 2 * project["counts"]["users"] <= train_rows <= 5 * project["counts"]["users"]
    assert_same_tensors(out_dir / "backbone" / "model.safetensors",
                        out_dir / "backbone" / "ckpt" / "best" / "model.safetensors")
    config = io.read_json(out_dir / "backbone" / "config.json")
    assert config["level_sizes"] == io.read_json(out_dir / "tokenizer" / "tokenizer.json")["level_sizes"]
    items = pl.read_parquet(out_dir / "items.parquet")
    assert config["attributes"] == ["category", "brand"]
    assert config["attr_sizes"] == [int(items["category_bucket"].max()) + 1, int(items["brand_bucket"].max()) + 1]
    assert config["model"]["d_model"] == 32 and config["model"]["d_ff"] == 64


def test_published_backbone_reproduces_the_best_validation_recall(project, backbone):
    params = project["params"]
    out_dir, bb = params.dataset_dir(), params.backbone
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    valid = valid_instances(params)
    ranked, _ = rank_with_backbone(load_backbone(out_dir), valid, table, trie, bb.valid_beam, bb.eval_batch_size,
                                   exclude_history=params.data.exclude_history)
    recall = ranking_metrics(ranked, valid.target.numpy(), ks=(5, 10, 20))[0]["recall@10"]
    assert recall == backbone["result"]["best_valid_recall@10"]
    history = [h[h >= 0].tolist() for h in valid.history.numpy()]
    assert not any(item in h for item, h in zip(ranked[:, 0].tolist(), history))  # data.exclude_history=true


def test_backbone_keeps_every_validations_per_user_ranks_and_they_give_its_logged_recall(project, backbone):
    from tasks.training import VALID_RANKS

    params = project["params"]
    ranks = pl.read_parquet(params.dataset_dir() / "backbone" / "ckpt" / VALID_RANKS)
    users = valid_instances(params).user.numpy()
    rows = read_log(params.reports_dir() / "backbone_log.csv")
    assert ranks["epoch"].unique().sort().to_list() == [int(r["epoch"]) for r in rows]
    for r in rows:
        epoch = ranks.filter(pl.col("epoch") == int(r["epoch"]))
        assert sorted(epoch["user_id"].to_list()) == sorted(users.tolist())
        rank = epoch["rank"].to_numpy()
        assert float(((rank >= 1) & (rank <= 10)).mean()) == pytest.approx(float(r["valid_recall@10"]), abs=1e-12)


def test_backbone_rerun_with_the_same_params_resumes_and_trains_nothing(project, backbone):
    params = project["params"]
    work = params.dataset_dir() / "backbone"
    again = body(train_backbone)(params)
    first = backbone["result"]
    assert again["epochs_run"] == first["epochs_run"] == 2
    assert (again["best_epoch"], again["best_valid_recall@10"]) == (first["best_epoch"], first["best_valid_recall@10"])
    assert (work / "model.safetensors").read_bytes() == backbone["model"]
    # the log is the checkpoint's history: a retrained epoch would carry a new train_s
    assert (params.reports_dir() / "backbone_log.csv").read_text() == backbone["log"]
    trainer = json.loads((work / "ckpt" / "last" / "trainer.json").read_text())
    assert trainer["fingerprint"] == backbone["trainer"]["fingerprint"]
    assert trainer["state"]["step"] == backbone["trainer"]["state"]["step"]


def test_backbone_restarts_when_a_param_it_reads_changes(project, backbone, tmp_path):
    """data.exclude_history changes the validation ranking, so a checkpoint made under the other
    value is not resumed (the stage once left it out of its fingerprint)."""
    from tasks.stages import fingerprint

    src = project["params"].dataset_dir()
    dst = tmp_path / "data" / "tiny"
    for rel in ("splits", "tokenizer", "backbone", "sasrec"):
        shutil.copytree(src / rel, dst / rel)
    shutil.copy(src / "items.parquet", dst / "items.parquet")
    old = backbone["trainer"]["fingerprint"]
    source = project["root"] / "source"  # the dataset spec, path included, is part of the fingerprint
    # the copy alone changes nothing: the fingerprint holds no output paths
    assert fingerprint(make_tiny_params(tmp_path, source=source), "backbone") == old
    params = make_tiny_params(tmp_path, "data.exclude_history=false", source=source)
    result = body(train_backbone)(params)
    trainer = json.loads((dst / "backbone" / "ckpt" / "last" / "trainer.json").read_text())
    assert trainer["fingerprint"] != old
    assert trainer["fingerprint"] == fingerprint(params, "backbone")
    rows = read_log(params.reports_dir() / "backbone_log.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and result["epochs_run"] == 2
    old_rows = [{k: (float(v) if v else None) for k, v in r.items()}
                for r in csv.DictReader(backbone["log"].splitlines())]
    assert [r["train_s"] for r in rows] != [r["train_s"] for r in old_rows]  # both epochs trained again
    top, epoch = best_in_log(rows, "epoch")
    assert (result["best_valid_recall@10"], result["best_epoch"]) == (top, epoch)


# --- SASRec -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sasrec(project):
    return body(train_baseline)(project["params"])


def test_sasrec_reports_its_log_and_saves_the_best_epoch(project, sasrec):
    params = project["params"]
    out_dir = params.dataset_dir()
    result = sasrec
    rows = read_log(params.reports_dir() / "sasrec_log.csv")
    assert result["epochs_run"] == len(rows) == 2  # sasrec.epochs=2, patience 6
    top, epoch = best_in_log(rows, "epoch")
    assert result["best"]["valid_recall@10"] == top
    assert result["best"]["epoch"] == epoch
    assert {k: float(v) for k, v in result["best"].items()} == next(r for r in rows if r["epoch"] == epoch)
    config = io.read_json(out_dir / "sasrec" / "config.json")
    assert config["n_items"] == project["counts"]["items"] == 40
    assert config["config"]["hidden"] == 16
    from grc_core.sasrec import evaluate

    again = evaluate(load_baseline(out_dir), load_rows(out_dir, "valid"))
    assert again["recall@10"] == pytest.approx(result["best"]["valid_recall@10"], abs=1e-12)
    assert again["ndcg@10"] == pytest.approx(result["best"]["valid_ndcg@10"], abs=1e-6)


def test_sasrec_report_names_the_epoch_whose_weights_it_saves_on_a_recall_tie(project, tmp_path, monkeypatch):
    import grc_core.sasrec

    script = iter([{"recall@5": 0.2, "recall@10": 0.4, "ndcg@5": 0.1, "ndcg@10": 0.1},
                   {"recall@5": 0.2, "recall@10": 0.4, "ndcg@5": 0.1, "ndcg@10": 0.2}])  # a tie; epoch 1 has better NDCG
    monkeypatch.setattr(grc_core.sasrec, "evaluate", lambda model, rows: next(script))
    src = project["params"].dataset_dir()
    dst = tmp_path / "data" / "tiny"
    shutil.copytree(src / "splits", dst / "splits")
    shutil.copy(src / "items.parquet", dst / "items.parquet")
    result = body(train_baseline)(make_tiny_params(tmp_path, "sasrec_ensemble.seeds=[]"))  # the first model only
    assert result["best"]["epoch"] == 1  # train_sasrec keeps epoch 1's weights


def test_the_ensembles_members_are_the_sasrecs_of_their_seeds_and_its_weight_is_chosen_on_validation(
        project, sasrec, backbone, tmp_path):
    from grc_core.data import history_mask
    from grc_core.sasrec import score_all
    from tasks.artifacts import histories_of, load_ranker
    from tasks.evaluate import rank_users

    params = project["params"]
    out_dir, (seed,) = params.dataset_dir(), params.sasrec_ensemble.seeds
    config = io.read_json(out_dir / "sasrec_ensemble" / "config.json")
    assert config["seeds"] == [seed] == sasrec["ensemble"]["seeds"] and config["weight"] == sasrec["ensemble"]["weight"]
    # the member is the model the first's training makes with its seed
    src, dst = out_dir, tmp_path / "data" / "tiny"
    shutil.copytree(src / "splits", dst / "splits")
    shutil.copy(src / "items.parquet", dst / "items.parquet")
    body(train_baseline)(make_tiny_params(tmp_path, f"sasrec.seed={seed}", "sasrec_ensemble.seeds=[]"))
    alone = load_file(str(dst / "sasrec" / "model.safetensors"))
    member = load_file(str(out_dir / "sasrec_ensemble" / "model.safetensors"))
    assert member.keys() == {f"{seed}.{k}" for k in alone}
    assert all(torch.equal(member[f"{seed}.{k}"], v) for k, v in alone.items())
    assert io.read_json(dst / "sasrec_ensemble" / "config.json")["seeds"] == []  # no seeds: the folder, empty
    # the weight, by hand: log softmax(log p_0 + w log p_1), history excluded, the best R@10, then N@10, then the smaller w
    valid = valid_instances(params)
    first, second = load_baseline(out_dir), load_baseline(dst)
    logp = [torch.log_softmax(torch.as_tensor(score_all(m, histories_of(valid))), -1) for m in (first, second)]
    mask = history_mask(valid.history, logp[0].shape[1])
    targets = valid.target.numpy()

    def ranks_at(w):
        fused = torch.log_softmax(logp[0] + w * logp[1], -1).masked_fill(mask, float("-inf"))
        higher = (fused > fused[torch.arange(len(targets)), targets][:, None]).sum(1)
        tied_before = ((fused == fused[torch.arange(len(targets)), targets][:, None])
                       & (torch.arange(fused.shape[1]) < torch.as_tensor(targets)[:, None])).sum(1)
        at = fused[torch.arange(len(targets)), targets]
        return torch.where(torch.isneginf(at), 0, higher + tied_before + 1).numpy()  # an excluded target: never ranked

    by_w = {}
    for w in params.sasrec_ensemble.weights:
        r = ranks_at(w)
        hit = (r >= 1) & (r <= 10)
        by_w[w] = (hit.mean(), np.where(hit, 1 / np.log2(np.maximum(r, 1) + 1), 0).mean())
    best = min(by_w, key=lambda w: (-by_w[w][0], -by_w[w][1], w))
    assert config["weight"] == best
    assert [row["recall@10"] for row in config["choice"]["valid"]] == pytest.approx([by_w[w][0] for w in by_w], abs=1e-12)
    # sasrec_ens ranks by that distribution (to the evaluate beam)
    users, ranks, _, _ = body(rank_users)(params, "sasrec_ens", "valid")
    expect = ranks_at(best)
    assert np.array_equal(ranks, np.where(expect <= params.evaluate.beam, expect, 0))
    # tiger_cf is steered by it: the beam with that distribution as its prior, decoded by hand
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    fused_prior = lambda inst: torch.log_softmax(  # noqa: E731
        torch.log_softmax(torch.as_tensor(score_all(first, histories_of(inst))), -1)
        + best * torch.log_softmax(torch.as_tensor(score_all(second, histories_of(inst))), -1), -1)
    ranked, _ = rank_with_backbone(load_backbone(out_dir), valid, table, trie, 20, 16, exclude_history=True,
                                   item_logp=fused_prior, cf_weight=2.0)
    mine, _ = load_ranker("tiger_cf", out_dir, params.dataset.attributes, "cpu", selection_decode(20, "union", 1.0), 16,
                          True, 2.0)(valid)
    assert np.array_equal(mine, ranked)
    # an ensemble other than the params' own is refused
    with pytest.raises(ValueError, match="sasrec_ensemble.seeds"):
        body(rank_users)(make_tiny_params(project["root"], f"sasrec_ensemble.seeds=[{seed + 1}]"), "tiger_cf", "valid")


def test_a_new_ensemble_resumes_the_sasrecs_already_trained_and_a_sasrec_param_retrains_them(
        project, tmp_path, monkeypatch):
    import grc_core.sasrec

    src, dst = project["params"].dataset_dir(), tmp_path / "data" / "tiny"
    shutil.copytree(src / "splits", dst / "splits")
    shutil.copy(src / "items.parquet", dst / "items.parquet")
    epochs = []  # the seed of the model each epoch trained
    real = grc_core.sasrec.train_epoch
    monkeypatch.setattr(grc_core.sasrec, "train_epoch",
                        lambda model, *a: epochs.append(model.cfg.seed) or real(model, *a))

    def run(*extra):
        epochs.clear()
        params = make_tiny_params(tmp_path, *extra)
        result = body(train_baseline)(params)
        return params, result, load_file(str(dst / "sasrec" / "model.safetensors")), \
            load_file(str(dst / "sasrec_ensemble" / "model.safetensors"))

    params, _, first, ens = run("sasrec_ensemble.seeds=[11]")
    n, seed = params.sasrec.epochs, params.sasrec.seed
    assert epochs == [seed] * n + [11] * n
    # another member and other weights: only the new member trains; the others resume as they were
    _, result, first2, ens2 = run("sasrec_ensemble.seeds=[11, 12]", "sasrec_ensemble.weights=[0.5]")
    assert epochs == [12] * n
    assert first2.keys() == first.keys() and all(torch.equal(first2[k], first[k]) for k in first)
    assert all(torch.equal(ens2[k], ens[k]) for k in ens) and {k.split(".")[0] for k in ens2} == {"11", "12"}
    assert result["ensemble"]["weight"] == 0.5 and result["ensemble"]["seeds"] == [11, 12]
    # history exclusion is read by the weight's choice only: no model trains again
    run("sasrec_ensemble.seeds=[11, 12]", "sasrec_ensemble.weights=[0.5]",
        f"data.exclude_history={str(not params.data.exclude_history).lower()}")
    assert epochs == []
    # a param a model's training reads starts every model afresh
    run("sasrec_ensemble.seeds=[11, 12]", "sasrec_ensemble.weights=[0.5]", f"sasrec.lr={params.sasrec.lr / 2}")
    assert epochs == [seed] * n + [11] * n + [12] * n


# --- mining -------------------------------------------------------------------------------------


def test_mined_drafts_have_m_rows_per_instance_and_labels_by_their_definition(project, mined):
    params = project["params"]
    out_dir = params.dataset_dir()
    codes, level_sizes = (np.asarray(pl.read_parquet(out_dir / "tokenizer" / "semantic_ids.parquet")
                                     .sort("item_id")["codes"].to_list()),
                          io.read_json(out_dir / "tokenizer" / "tokenizer.json")["level_sizes"])
    n_levels = len(level_sizes)
    assert mined["num_levels"] == n_levels
    items = pl.read_parquet(out_dir / "items.parquet").sort("item_id")
    for split in ("train", "valid"):
        frame = pl.read_parquet(out_dir / "mine" / f"{split}.parquet").sort("instance", "cand")
        rows = pl.read_parquet(out_dir / "splits" / f"{split}.parquet")
        per = frame.group_by("instance").agg(pl.col("cand").sort()).sort("instance")
        # mine.max_instances / valid_instances exceed the tiny splits: every instance is mined
        assert per["instance"].to_list() == list(range(rows.height))
        assert all(c == list(range(TOP + SAMPLED)) for c in per["cand"].to_list())
        assert frame.height == (TOP + SAMPLED) * rows.height
        assert frame["r_loc"].min() >= 1 and frame["r_loc"].max() <= n_levels + 1
        assert frame.filter(pl.col("cand") < TOP)["beam_rank"].to_list() == [0, 1] * rows.height
        assert frame.filter(pl.col("cand") >= TOP)["beam_rank"].min() >= TOP
        cat, brand = items["category_bucket"].to_numpy(), items["brand_bucket"].to_numpy()
        for r in frame.iter_rows(named=True):
            row = rows.row(r["instance"], named=True)
            assert (r["user_id"], r["target"]) == (row["user_id"], row["target"])
            assert r["codes"] == codes[r["item"]].tolist()
            diff = [t for t in range(n_levels) if codes[r["item"], t] != codes[r["target"], t]]
            assert r["r_loc"] == (diff[0] + 1 if diff else n_levels + 1)  # Eq. 4: first wrong level, L+1 = right
            assert r["r_sem_category"] == int(cat[r["item"]] == cat[r["target"]])
            assert r["r_sem_brand"] == int(brand[r["item"]] == brand[r["target"]])
            assert r["item"] not in row["history"]  # data.exclude_history=true
        assert sum(mined[split]["r_loc_share"].values()) == pytest.approx(1.0, abs=1e-9)
    assert [f["fold"] for f in mined["crossfit"]["fold_backbones"]] == [0, 1]  # mine.crossfit_folds=2
    assert sum(f["mined_instances"] for f in mined["crossfit"]["fold_backbones"]) == \
        pl.read_parquet(out_dir / "splits" / "train.parquet").height


# --- SFT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["grc", "gc"])
def test_sft_reports_its_log_and_publishes_the_best_checkpoint(project, sft, variant):
    params = project["params"]
    out_dir, result = params.dataset_dir(), sft[variant]
    work = out_dir / "sft" / variant
    rows = read_log(params.reports_dir() / f"sft_{variant}_log.csv")
    assert [int(r["epoch"]) for r in rows] == [1] and result["epochs_run"] == 1  # sft.train.epochs=1
    top, epoch = best_in_log(rows, "epoch")
    assert (result["best_valid_recall@10"], result["best_epoch"]) == (top, epoch)
    assert result["drafts_per_instance"] == TOP + SAMPLED
    assert result["instances"] == pl.read_parquet(out_dir / "mine" / "train.parquet")["instance"].n_unique()
    assert_same_tensors(work / "model.safetensors", work / "ckpt" / "best" / "model.safetensors")
    config = io.read_json(work / "config.json")
    backbone_config = io.read_json(out_dir / "backbone" / "config.json")
    assert config["variant"] == variant and config["num_attrs"] == 2
    assert (config["model"], config["level_sizes"], config["attr_sizes"]) == (
        backbone_config["model"], backbone_config["level_sizes"], backbone_config["attr_sizes"])
    model = load_grc(out_dir, f"{variant}_sft")
    assert model.template.reflect == (variant == "grc")
    assert grc_valid_recall(params, f"{variant}_sft", params.sft.valid_beam, params.sft.eval_batch_size) == top


# --- GRPO -----------------------------------------------------------------------------------------


def test_grpo_reports_its_log_and_publishes_the_best_iteration(project, grpo):
    params = project["params"]
    out_dir = params.dataset_dir()
    rows = read_log(params.reports_dir() / "grpo_log.csv")
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3] and grpo["iterations"] == 3  # grpo.loop.iterations=3
    # validated at the SFT start, every grpo.loop.eval_every=2 iterations and at the last one
    assert [int(r["iteration"]) for r in rows if r["valid_recall@10"] is not None] == [0, 2, 3]
    top, iteration = best_in_log(rows, "iteration")
    assert (grpo["best_valid_recall@10"], grpo["best_iteration"]) == (top, iteration)
    assert grpo["start_valid_recall@10"] == rows[0]["valid_recall@10"]
    assert_same_tensors(out_dir / "grpo" / "model.safetensors", out_dir / "grpo" / "ckpt" / "best" / "model.safetensors")
    assert io.read_json(out_dir / "grpo" / "config.json") == io.read_json(out_dir / "sft" / "grc" / "config.json")
    rl, start = load_file(str(out_dir / "grpo" / "model.safetensors")), load_file(str(out_dir / "sft" / "grc" / "model.safetensors"))
    same = all(torch.equal(rl[k], start[k]) for k in start)
    assert same == (iteration == 0)  # best at the start: the SFT weights themselves; later: updated weights
    assert grc_valid_recall(params, "grc_rl", params.grpo.valid_beam, params.grpo.eval_batch_size) == top


# --- the champion ---------------------------------------------------------------------------------


def test_a_deliberately_weak_method_never_becomes_champion(project, sasrec, grpo, monkeypatch):
    # Every trained method is ranked on the validation split by evaluate's own task; gc_sft is
    # replaced by a ranker that never lists the user's target (the weakest possible list).
    import tasks.evaluate as ev_tasks
    from tasks.evaluate import leaderboard, rank_users

    params = project["params"]
    real = ev_tasks.load_ranker
    n_items = project["counts"]["items"]

    def weak_or_real(method, *args):
        if method != "gc_sft":
            return real(method, *args)
        def rank(inst, progress=None, stats=None):  # every item but the user's target, in id order
            items = np.tile(np.arange(n_items), (len(inst), 1))
            items = items[items != inst.target.numpy()[:, None]].reshape(len(inst), n_items - 1)
            return items, np.zeros(items.shape, np.float32)
        return rank

    monkeypatch.setattr(ev_tasks, "load_ranker", weak_or_real)
    ranks = {}
    for method in ("gc_sft", "tiger", "sasrec", "grc_sft", "grc_rl"):  # the weak one first: order is no advantage
        users, r, _, _ = body(rank_users)(params, method, "valid")
        assert len(users) == len(valid_instances(params))  # evaluate.valid_users=0: every validation user
        ranks[method] = r
    board = leaderboard(ranks, params.evaluate.beam, 200, 0)
    assert board["champion"] != "gc_sft" and board["methods"][-1]["method"] == "gc_sft"
    assert board["methods"][-1]["metrics"]["recall@10"] == 0.0 < board["methods"][0]["metrics"]["recall@10"]
    assert board["methods"][0]["metrics"]["recall@10"] == max(m["metrics"]["recall@10"] for m in board["methods"])
    # the leaderboard's tiger figure is tiger's validation recall at the evaluate beam, computed independently
    table, trie, _, _ = item_index(params.dataset_dir(), params.dataset.attributes, "cpu")
    valid = valid_instances(params)
    ranked, _ = rank_with_backbone(load_backbone(params.dataset_dir()), valid, table, trie, params.evaluate.beam,
                                   64, exclude_history=params.data.exclude_history)
    tiger = next(m for m in board["methods"] if m["method"] == "tiger")
    assert tiger["metrics"]["recall@10"] == pytest.approx(
        ranking_metrics(ranked, valid.target.numpy(), ks=(10,))[0]["recall@10"], abs=1e-12)


def test_a_method_with_anothers_weights_takes_its_ranks_and_a_changed_one_is_decoded(project, grpo, tmp_path):
    """An RL stage that kept iteration 0 publishes its start weights: evaluate then reuses that
    method's ranks (`rank_or_reuse`), which equal a real decode; a changed weight decodes anew."""
    from safetensors.torch import save_file

    from tasks.artifacts import decode_identity
    from tasks.evaluate import rank_or_reuse, rank_users

    src = project["params"].dataset_dir()
    params = make_tiny_params(tmp_path, source=project["root"] / "source")
    out_dir = params.dataset_dir()
    shutil.copytree(src, out_dir)
    for name in ("model.safetensors", "config.json"):  # GRPO kept iteration 0; vstar's plain-GRPO control too
        shutil.copy(out_dir / "sft" / "grc" / name, out_dir / "grpo" / name)
    (out_dir / "vstar" / "tiger_rl").mkdir(parents=True)
    shutil.copy(out_dir / "backbone" / "model.safetensors", out_dir / "vstar" / "tiger_rl" / "model.safetensors")
    rank = body(rank_users)
    assert decode_identity(out_dir, "grc_rl") == decode_identity(out_dir, "grc_sft") != decode_identity(out_dir, "gc_sft")
    assert decode_identity(out_dir, "tiger_rl") == decode_identity(out_dir, "tiger") != decode_identity(out_dir, "grc_sft")
    assert decode_identity(out_dir, "vstar") is None and decode_identity(out_dir, "tiger_cf") is None  # no weights; no twin
    done = {}
    for first, twin in (("grc_sft", "grc_rl"), ("tiger", "tiger_rl")):
        users, ranks, _, extra = rank_or_reuse(params, first, "valid", done, rank)
        assert "same_ranks_as" not in extra
        users2, ranks2, wall, extra2 = rank_or_reuse(params, twin, "valid", done, rank)
        assert extra2["same_ranks_as"] == first and wall == 0.0
        assert (users2 == users).all() and (ranks2 == ranks).all()
        real_users, real_ranks, _, _ = rank(params, twin, "valid")  # what decoding the twin gives
        assert (real_users == users).all() and (real_ranks == ranks).all()
    weights = load_file(str(out_dir / "grpo" / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 1e-3  # one update: another model
    save_file(weights, str(out_dir / "grpo" / "model.safetensors"))
    assert "same_ranks_as" not in rank_or_reuse(params, "grc_rl", "valid", done, rank)[3]


def test_a_backbone_trained_with_sasrecs_prior_starts_at_zero_and_tiger_cf_decodes_it_levelwise(
        project, sasrec, backbone, tmp_path, monkeypatch):
    """backbone.cf_prior: the heads start at zero (the product starts as SASRec alone), the published
    config records the prior, and `tiger_cf` decodes that backbone by the per-level product."""
    import tasks.training as training
    from tasks.artifacts import backbone_cf_mode, load_ranker, sasrec_log_probs

    params, src, dst = backbone_inputs_copy(project, tmp_path, "backbone.cf_prior=1.0")
    started = {}
    real_fit = training.fit_seq2seq

    def spy(model, *args, **kwargs):
        started["heads"] = [h.weight.abs().sum().item() + h.bias.abs().sum().item() for h in model.heads]
        started["prior"] = kwargs["prior_weight"]
        return real_fit(model, *args, **kwargs)
    monkeypatch.setattr(training, "fit_seq2seq", spy)
    body(train_backbone)(params)
    assert started == {"heads": [0.0] * len(started["heads"]), "prior": 1.0}
    assert io.read_json(dst / "backbone" / "config.json")["cf_prior"] == 1.0
    assert backbone_cf_mode(dst) == "levelwise" and backbone_cf_mode(src) == "shallow"
    table, trie, _, _ = item_index(dst, params.dataset.attributes, "cpu")
    valid = load_split(dst, "valid", params.data.max_history)
    ranker = load_ranker("tiger_cf", dst, params.dataset.attributes, "cpu", selection_decode(20, "union", 1.0), 16,
                         True, 1.0)
    got = ranker(valid)[0]
    backbone, logp = load_backbone(dst), sasrec_log_probs(load_baseline(dst))
    levelwise = rank_with_backbone(backbone, valid, table, trie, 20, 16, exclude_history=True, item_logp=logp,
                                   cf_weight=1.0, cf_mode="levelwise")[0]
    shallow = rank_with_backbone(backbone, valid, table, trie, 20, 16, exclude_history=True, item_logp=logp,
                                 cf_weight=1.0)[0]
    assert np.array_equal(got, levelwise) and not np.array_equal(got, shallow)
    # Everything that reads the backbone's distribution alone refuses it, naming the file and the field.
    from tasks.vstar import train_variant
    for call in (lambda: body(mine_labels)(params), lambda: body(train_sft)(params, "grc"),
                 lambda: body(train_variant)(params, "vstar"),
                 lambda: load_ranker("tiger", dst, params.dataset.attributes, "cpu", selection_decode(20, "union", 1.0),
                                     16, True, 1.0)):
        with pytest.raises(ValueError, match=r"backbone/config\.json: field cf_prior is 1"):
            call()


def validation_recall(model, params, dst) -> float:
    """The loaded `model`'s Recall@10 on the validation users the backbone stage selects on."""
    table, trie, _, _ = item_index(dst, params.dataset.attributes, "cpu")
    valid = valid_instances(params)
    ranked, _ = rank_with_backbone(model, valid, table, trie, params.backbone.valid_beam,
                                   params.backbone.eval_batch_size, exclude_history=params.data.exclude_history)
    return ranking_metrics(ranked, valid.target.numpy(), ks=(5, 10, 20))[0]["recall@10"]


def trained_with_item_table(project, root: Path, flag: str):
    """A backbone trained with `backbone.model.<flag>=true` on a copy of the project's inputs; its
    published config must record the flag and the item count. Returns (params, its dataset dir, the
    stage's result, the config, the loaded backbone)."""
    params, _, dst = backbone_inputs_copy(project, root, f"backbone.model.{flag}=true")
    result = body(train_backbone)(params)
    config = io.read_json(dst / "backbone" / "config.json")
    assert config["model"][flag] is True and config["n_items"] == pl.read_parquet(dst / "items.parquet").height
    return params, dst, result, config, load_backbone(dst)


def test_a_backbone_with_item_embeddings_publishes_them_and_reproduces_its_validation_recall(
        project, sasrec, backbone, tmp_path):
    """backbone.model.item_embedding: the published config records the flag and the item count,
    the loaded backbone has one embedding row per item, it reproduces the stage's validation
    recall, and the GRC template built from its config takes its weights."""
    from grc_core.grc import grc_from_config

    params, dst, result, config, model = trained_with_item_table(project, tmp_path, "item_embedding")
    n_items = config["n_items"]
    assert model.enc_items.weight.shape == (n_items, params.backbone.model.d_model)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert validation_recall(model, params, dst) == result["best_valid_recall@10"]
    grc = grc_from_config({**config, "num_attrs": 2, "variant": "grc"})
    assert grc.seq.enc_items.weight.shape == (n_items, params.backbone.model.d_model)
    grc.seq.load_state_dict(model.state_dict())  # strict: the template's backbone is this architecture


def test_a_backbone_with_a_dense_head_publishes_it_and_its_beam_takes_the_head_as_a_value(
        project, sasrec, backbone, tmp_path):
    """backbone.model.dense_head: the published config records the head and the item count, the
    loaded backbone reproduces the stage's validation recall, its head gives a distribution over the
    catalog, and its beam can be steered by it (grc_core tests check that the head learns)."""
    from grc_core.data import to_batch
    from grc_core.evaluation import dense_item_logp

    params, dst, result, config, model = trained_with_item_table(project, tmp_path, "dense_head")
    n_items = config["n_items"]
    assert validation_recall(model, params, dst) == result["best_valid_recall@10"]
    table, trie, _, _ = item_index(dst, params.dataset.attributes, "cpu")
    valid = valid_instances(params)
    logp = model.dense_log_probs(to_batch(valid, table, with_target=False))  # (U, N)
    assert logp.shape == (len(valid), n_items)
    torch.testing.assert_close(logp.logsumexp(1), torch.zeros(len(valid)), atol=1e-5, rtol=0)
    plain, _ = rank_with_backbone(model, valid, table, trie, 10, 16, exclude_history=True)
    steered, _ = rank_with_backbone(model, valid, table, trie, 10, 16, exclude_history=True,
                                    experts=[(dense_item_logp(model, table), 4.0)])
    assert not np.array_equal(plain, steered)


def test_the_dense_head_benchmark_ranks_every_family_against_the_plain_run(project, sasrec, backbone, tmp_path,
                                                                          monkeypatch):
    """benchmarks.dense_head on a dense copy of the tiny run, its base the project's run: every
    family's validation (cross-fitted) and test rank files, TIGER's (0, 0) test ranks the plain
    beam's, and the base's tiger_cf at its chosen weight SASRec's value in the base backbone's beam."""
    from benchmarks import dense_head
    from grc_core import metrics as M
    from tasks.artifacts import sasrec_log_probs

    monkeypatch.setattr("benchmarks.common.RESULTS", tmp_path / "results")
    overrides = tiny_overrides(tmp_path, "backbone.model.dense_head=true", source=project["root"] / "source")
    params, src, dst = backbone_inputs_copy(project, tmp_path, "backbone.model.dense_head=true")
    body(train_backbone)(params)
    report = dense_head.main([*(x for o in overrides for x in ("-S", o)), "--base", str(src.parent),
                              "--dense-weights", "0", "2", "--cf-weights", "0", "2", "--beam", "10", "--bootstrap", "20"])
    names = {"tiger", "tiger_cf", "tiger_dense", "tiger_dense_cf", "base_tiger", "base_tiger_cf", "sasrec", "dense"}
    for where in ("eval_dense", "eval_dense/valid"):
        assert {p.stem for p in (dst / where).glob("*.parquet")} == names
    assert report["valid"]["chosen"]["tiger_dense_cf"] == [2.0, 2.0] and report["valid"]["chosen"]["tiger"] == [0.0, 0.0]
    table, trie, _, _ = item_index(dst, params.dataset.attributes, "cpu")
    test = load_split(dst, "test", params.data.max_history)
    saved = pl.read_parquet(dst / "eval_dense" / "tiger.parquet")
    ranked, _ = rank_with_backbone(load_backbone(dst), test, table, trie, 10, 64, exclude_history=True)
    np.testing.assert_array_equal(saved["rank"].to_numpy(), M.target_ranks(ranked, test.target.numpy()))
    ranked, _ = rank_with_backbone(load_backbone(src), test, table, trie, 10, 64, exclude_history=True,
                                   item_logp=sasrec_log_probs(load_baseline(src)), cf_weight=2.0)
    saved = pl.read_parquet(dst / "eval_dense" / "base_tiger_cf.parquet")
    np.testing.assert_array_equal(saved["rank"].to_numpy(), M.target_ranks(ranked, test.target.numpy()))


def test_a_backbone_with_sasrecs_user_state_carries_that_sasrec_and_reproduces_its_validation_recall(
        project, sasrec, backbone, tmp_path):
    """backbone.model.cf_token: the backbone holds the sasrec stage's weights unchanged after
    training, its config.json rebuilds it (SASRec's architecture included), the loaded model
    reproduces the stage's validation recall; mining, SFT and GRPO run on it, and the GRC-RL model
    still holds that SASRec, unchanged, and reproduces GRPO's validation recall."""
    params, _, dst = backbone_inputs_copy(project, tmp_path, "backbone.model.cf_token=true")
    result = body(train_backbone)(params)
    config = io.read_json(dst / "backbone" / "config.json")
    assert config["model"]["cf_token"] is True
    assert config["cf_sasrec"] == io.read_json(dst / "sasrec" / "config.json")  # its fields, as the sasrec stage wrote them
    model = load_backbone(dst)
    stage_sasrec = load_baseline(dst).state_dict()
    assert all(torch.equal(v, stage_sasrec[k]) for k, v in model.cf.state_dict().items())
    assert validation_recall(model, params, dst) == result["best_valid_recall@10"]
    body(mine_labels)(params)
    body(train_sft)(params, "grc")
    rl = body(train_grpo)(params)
    assert io.read_json(dst / "grpo" / "config.json")["cf_sasrec"] == config["cf_sasrec"]
    policy = load_grc(dst, "grc_rl")
    assert all(torch.equal(v, stage_sasrec[k]) for k, v in policy.seq.cf.state_dict().items())
    assert grc_valid_recall(params, "grc_rl", params.grpo.valid_beam, params.grpo.eval_batch_size) == \
        rl["best_valid_recall@10"]


def test_cross_fitted_teachers_score_each_user_with_a_sasrec_that_never_saw_them(project, sasrec, tmp_path):
    from grc_core.data import user_folds
    from grc_core.sasrec import SASRec
    from tasks.artifacts import sasrec_log_probs
    from tasks.backbone import crossfit_teacher

    params, _, dst = backbone_inputs_copy(project, tmp_path, "backbone.cf_prior=1.0", "backbone.cf_teacher_folds=2")
    teacher, info = crossfit_teacher(params, torch.device("cpu"))
    train_rows = pl.read_parquet(dst / "splits" / "train.parquet")
    folds = user_folds(train_rows["user_id"].to_numpy(), 2, params.backbone.train.seed)
    assert [i["train_rows"] for i in info] == [int((folds != 0).sum()), int((folds != 1).sum())]
    assert 0 < info[0]["train_rows"] < train_rows.height
    inst = load_split(dst, "train", params.data.max_history)
    got = teacher(inst)
    n_items = pl.read_parquet(dst / "items.parquet").height
    inst_folds = user_folds(inst.user.numpy(), 2, params.backbone.train.seed)
    for f in (0, 1):
        model = SASRec(n_items, params.sasrec)
        model.load_state_dict(load_file(str(dst / "backbone" / "teachers" / f"f{f}" / "ckpt" / "best" / "model.safetensors")))
        idx = torch.from_numpy(np.flatnonzero(inst_folds == f))
        assert len(idx) and torch.allclose(got[idx], sasrec_log_probs(model.eval())(inst.select(idx)), atol=1e-5)
    full = sasrec_log_probs(load_baseline(dst))(inst)
    assert not torch.allclose(got, full, atol=1e-3)  # not the stage's SASRec
    again, _ = crossfit_teacher(params, torch.device("cpu"))  # resumed from its checkpoints: the same teachers
    assert torch.equal(again(inst), got)
