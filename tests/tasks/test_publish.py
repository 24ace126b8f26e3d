"""Scheduled retraining on a growing log, through the task bodies: two runs on a log that grows
between them publish two dumps; a third run whose model is made worse on purpose is refused and
`current` still points at the second."""

import json
import os

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from tasks import io
from tasks.candidates import dump_ranker, plan_dump, rank_shard, write_manifest, write_shard
from tasks.evaluate import leaderboard, rank_users, save_ranks
from tasks.ingest import ingest_parquet, source_hash
from tasks.publish import (CURRENT, DECISIONS, append_publication, current_dump, promotion_decision, publish_dump,
                           published_root, record_decision)
from tasks.sasrec import train_baseline
from tests.tasks.test_ingest_stream import write_parquet_source

N_ITEMS = 60
OVERRIDES = ("evaluate.methods=[sasrec]", "candidates.method=auto", "evaluate.beam=20", "evaluate.bootstrap=50",
             "candidates.top_n=10", "candidates.beam=20", "candidates.promotion_tolerance=0.2",
             "sasrec.epochs=8", "sasrec.hidden=32", "sasrec.batch_size=32", "sasrec.dropout=0.0", "sasrec.patience=8",
             "sasrec.lr=0.01")


def chain_rows(users: range, start_pos: int, length: int, day: int, catalog: int = N_ITEMS) -> list[tuple]:
    """User u buys items u, u+1, ... (mod `catalog`) in order: the next item is always the last + 1."""
    return [(u, (u + p) % catalog, 10 * p, day) for u in users for p in range(start_pos, start_pos + length)]


def scheduled_run(params, worse: bool = False) -> dict:
    """ingest -> sasrec -> evaluate (validation leaderboard) -> candidates -> promotion, as the
    pipeline's stages run them, without a server."""
    out_dir = params.dataset_dir()
    ingest_parquet.fn(params.dataset, params, out_dir / "interactions.duckdb", out_dir, params.reports_dir(),
                      source_hash(params.dataset, params))
    train_baseline.fn(params)
    if worse:  # the trained weights replaced by noise
        weights = load_file(str(out_dir / "sasrec" / "model.safetensors"))
        gen = torch.Generator().manual_seed(0)
        io.write_safetensors(out_dir / "sasrec" / "model.safetensors",
                             {k: torch.randn(v.shape, generator=gen) for k, v in weights.items()})
    users, ranks, _, _ = rank_users.fn(params, "sasrec", "valid")
    save_ranks(out_dir, "sasrec", users, ranks, "valid")
    io.write_json(out_dir / "eval" / "leaderboard.json", leaderboard({"sasrec": ranks}, 20, 50, 0))
    plan = plan_dump.fn(params)
    rank = dump_ranker(params, plan)
    records = [write_shard.fn(plan.out_dir, s, rank_shard.fn(rank, s, plan.top_n), plan.fingerprint)
               for s in plan.shards]
    manifest = write_manifest.fn(plan, records)
    # flows/candidates.promote, task by task
    root = published_root(params)
    decision = promotion_decision.fn(params, plan.method, current_dump(root))
    published = publish_dump.fn(params, manifest, decision) if decision["promoted"] else None
    record_decision(root, {**decision, "version": published.name if published else None})
    (params.reports_dir() / "report.md").write_text("# run report\n")
    append_publication(params.reports_dir() / "report.md", decision, published)
    return {"decision": decision, "published": published, "manifest": manifest}


@pytest.fixture
def project(make_params, tmp_path):
    root = write_parquet_source(tmp_path / "log", chain_rows(range(40), 0, 6, 1))
    return root, make_params(root, fmt="parquet", overrides=OVERRIDES)


def test_two_growing_runs_publish_and_a_worse_model_is_refused(project):
    root, params = project
    first = scheduled_run(params)
    assert first["decision"]["promoted"] and "first publication" in first["decision"]["reason"]
    pub = published_root(params)
    assert current_dump(pub) == first["published"]

    # The log grows: two more items for every user, and new users on new items (ids 60..64).
    write_parquet_source(root, chain_rows(range(40), 6, 2, 2))
    write_parquet_source(root, [(1000 + u, N_ITEMS + (u + p) % 5, 10 * p, 3) for u in range(5) for p in range(5)])
    second = scheduled_run(params)
    d2 = second["decision"]
    assert d2["promoted"], d2["reason"]
    assert d2["published"]["version"] == first["published"].name and d2["users"] == 45
    assert os.readlink(pub / CURRENT) == second["published"].name
    assert d2["recall@10"] > 0.5  # the chain is learnt: far above a random ranking's 10/65

    third = scheduled_run(params, worse=True)
    d3 = third["decision"]
    assert not d3["promoted"]
    assert d3["recall@10"] < d3["published"]["recall@10"] - 0.2
    assert "below the tolerance 0.2" in d3["reason"]
    assert current_dump(pub) == second["published"]  # the second dump stays published
    assert sorted(p.name for p in pub.iterdir() if not p.name.startswith(".")) == sorted(
        [first["published"].name, second["published"].name, CURRENT, DECISIONS])
    # The published folder holds the dump as the manifest lists it, and the model it came from.
    cur = pub / CURRENT
    manifest = io.read_json(cur / "manifest.json")
    assert manifest == second["manifest"]
    dump = pl.read_parquet(sorted(cur.glob("part-*.parquet")))
    assert dump.height == manifest["rows"] == 45 * 10
    assert (cur / "model" / "sasrec" / "model.safetensors").is_file()
    assert [json.loads(line)["promoted"] for line in (pub / DECISIONS).read_text().splitlines()] == [True, True, False]
    assert "**refused**" in (params.reports_dir() / "report.md").read_text()


def test_the_published_model_is_scored_on_items_it_knows(project):
    """A model trained before the catalog grew ranks only the items it knows: a target it never
    saw is a miss, and unknown history items are dropped, not passed to the model."""
    root, params = project
    scheduled_run(params)
    write_parquet_source(root, [(1000 + u, N_ITEMS + (u + p) % 5, 10 * p, 3) for u in range(5) for p in range(5)])
    out_dir = params.dataset_dir()
    ingest_parquet.fn(params.dataset, params, out_dir / "interactions.duckdb", out_dir, params.reports_dir(),
                      source_hash(params.dataset, params))
    from tasks.publish import score_published

    ranks = score_published.fn(params, current_dump(published_root(params)) / "model", "sasrec")
    new_users = ranks.filter(pl.col("user_id") >= 40)
    assert new_users.height == 5 and (new_users["rank"] == 0).all()  # only new items: nothing it can rank
    assert np.mean(ranks.filter(pl.col("user_id") < 40)["rank"].to_numpy() > 0) > 0.5


def test_a_published_tiger_cf_dump_is_scored_at_the_weight_its_manifest_records(tmp_path):
    from tasks.publish import LEGACY_CF_WEIGHT, published_cf_weight

    io.write_json(tmp_path / "manifest.json", {"method": "tiger_cf", "cf_weight": 2.0})
    assert published_cf_weight(tmp_path) == 2.0
    io.write_json(tmp_path / "manifest.json", {"method": "tiger_cf"})  # published before evaluate chose it
    assert published_cf_weight(tmp_path) == LEGACY_CF_WEIGHT == 4.0
