"""Publishing candidate dumps behind a promotion gate.

`data/<dataset>/candidates/` is where the dump is built (and resumed); what readers should use is
the published copy under `data/<dataset>/published/`:

- `<version>/`: one published dump: its shards and `manifest.json`, `model/` (the weights,
  configs, tokenizer files and items.parquet the dumped method decodes with, so the model can be
  scored again later on newer data) and `promotion.json` (the decision that published it).
- `current`: a symlink to the version readers use, replaced atomically (a new link renamed over
  it), so a reader sees the old dump or the new one, never a mix.
- `decisions.jsonl`: one line per decision, promoted or refused.

The gate (`promotion_decision`): the new dump is published only if its method's validation
Recall@10 (this run's champion, ranked by evaluate on this run's validation split) is not below
the published model's Recall@10 on the same users of the same split by more than
`candidates.promotion_tolerance`. The published model is scored again here, from `model/`, on
this run's split: a model trained on less data is measured on the new users and targets. Items
it has never seen (the catalog grew) are dropped from its histories and, as targets, count as
misses; a user whose whole history is new to it counts as a miss too.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
from prefect import task

from grc_core import metrics as M
from grc_core.data import make_instances
from grc_core.device import resolve_device
from tasks import io
from tasks.artifacts import decode_config, load_ranker, model_files, subset
from tasks.params import Params
from tasks.stages import ITEM_ID_METHODS
from tasks.store import published_paths

CURRENT = "current"
DECISIONS = "decisions.jsonl"
PROMOTION = "promotion.json"


class PromotionRefused(RuntimeError):
    """The new champion is worse than the published model by more than the tolerance."""


def published_root(params: Params) -> Path:
    return params.dataset_dir() / "published"


def current_dump(root: Path) -> Path | None:
    """The published version `current` points at, or None before the first publication."""
    link = root / CURRENT
    return root / os.readlink(link) if link.is_symlink() else None


def bundle_files(method: str) -> tuple[str, ...]:
    """What `method` decodes with, relative to data/<dataset>/ (and to a bundle's `model/`)."""
    files = model_files(method)
    if method not in ITEM_ID_METHODS:
        files += ("tokenizer/semantic_ids.parquet", "tokenizer/tokenizer.json", "items.parquet")
    return files


def known_items(bundle: Path, method: str) -> int:
    """How many items (ids 0 .. n-1) the bundled model knows."""
    if method in ITEM_ID_METHODS:
        return int(io.read_json(bundle / "sasrec" / "config.json")["n_items"])
    return io.parquet_rows(bundle / "tokenizer" / "semantic_ids.parquet")


LEGACY_CF_WEIGHT = 4.0  # evaluate.cf_weight, fixed before evaluate chose it: manifests of then carry no cf_weight


def published_cf_weight(version: Path) -> float:
    """The weight of SASRec's prefix value a published tiger_cf dump was decoded with (its
    manifest's `cf_weight`)."""
    weight = io.read_json(version / "manifest.json").get("cf_weight")
    return LEGACY_CF_WEIGHT if weight is None else float(weight)


def valid_ranks(params: Params, method: str) -> pl.DataFrame:
    """This run's validation ranks of `method` (user_id, rank), written by evaluate."""
    path = params.dataset_dir() / "eval" / "valid" / f"{method}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"promotion gate: {path} does not exist; run the evaluate stage first")
    return io.read_parquet(path)


@task
def score_published(params: Params, bundle: Path, method: str, cf_weight: float = 0.0) -> pl.DataFrame:
    """The bundled model's 1-based validation ranks (user_id, rank; 0 = miss) on this run's
    validation split, the users evaluate ranked (`evaluate.valid_users`, same subset); tiger_cf
    at the weight its dump was decoded with (`published_cf_weight`)."""
    ev, out_dir = params.evaluate, params.dataset_dir()
    frame = io.read_parquet(published_paths(out_dir)["splits/valid.parquet"])
    n_known = known_items(bundle, method)
    histories = [[i for i in h if i < n_known] for h in frame["history"].to_list()]  # items it never saw dropped
    inst = subset(make_instances(frame["user_id"].to_list(), histories, frame["target"].to_list(),
                                 params.data.max_history), ev.valid_users, ev.users_seed)
    users, targets = inst.user.numpy(), inst.target.numpy()
    ranks = np.zeros(len(inst), dtype=np.int64)
    usable = np.flatnonzero((inst.history >= 0).any(1).numpy())  # (U',) users with a known history item
    if len(usable):
        rank = load_ranker(method, bundle, params.dataset.attributes, resolve_device(ev.device),
                           decode_config(ev, ev.beam, params.vstar.ved_test), ev.batch_size,
                           params.data.exclude_history, cf_weight)
        import torch

        ranked, _ = rank(inst.select(torch.as_tensor(usable)))
        ranks[usable] = M.target_ranks(ranked, targets[usable])
    return pl.DataFrame({"user_id": users.astype(np.int64), "rank": ranks})


def recall_at_10(ranks: np.ndarray) -> float:
    return float(M.per_user_metrics(ranks, (10,), ())["recall@10"].mean()) if len(ranks) else 0.0


@task
def promotion_decision(params: Params, method: str, incumbent: Path | None) -> dict:
    """Promote or refuse the dump of `method` against the published one (module docstring)."""
    tol = params.candidates.promotion_tolerance
    new = valid_ranks(params, method)
    decision = {"method": method, "tolerance": tol, "split": "valid", "users": new.height,
                "recall@10": recall_at_10(new["rank"].to_numpy()),
                "decided": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if incumbent is None:
        return {**decision, "promoted": True, "reason": "first publication: no published model to compare with"}
    published = io.read_json(incumbent / PROMOTION)
    old = score_published.fn(params, incumbent / "model", published["method"],
                             published_cf_weight(incumbent) if published["method"] == "tiger_cf" else 0.0)
    both = new.join(old, on="user_id", suffix="_published")
    a, b = both["rank_published"].to_numpy(), both["rank"].to_numpy()
    old_r, new_r = recall_at_10(a), recall_at_10(b)
    paired = M.paired_bootstrap(M.per_user_metrics(a, (10,), ())["recall@10"],
                                M.per_user_metrics(b, (10,), ())["recall@10"], params.evaluate.bootstrap,
                                params.evaluate.users_seed)
    promoted = new_r >= old_r - tol
    verdict = "not below" if new_r >= old_r else ("within" if promoted else "below")
    reason = (f"validation recall@10 of {method} {new_r:.4f} against the published {published['method']} "
              f"(version {incumbent.name}) {old_r:.4f} on the same {both.height} users: {new_r - old_r:+.4f}, "
              f"{verdict} the tolerance {tol:g}")
    return {**decision, "promoted": promoted, "reason": reason, "recall@10": new_r,
            "published": {"version": incumbent.name, "method": published["method"], "recall@10": old_r},
            "paired_recall@10": paired, "users": both.height}


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where possible: the sources are replaced by rename, never rewritten in place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def switch_current(root: Path, version: str) -> None:
    """Point `current` at `version`: a new symlink renamed over the old one (atomic on POSIX)."""
    tmp = root / f".{CURRENT}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(version, tmp)
    os.replace(tmp, root / CURRENT)
    io.fsync_path(root)


def record_decision(root: Path, decision: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / DECISIONS, "a", encoding="utf-8") as f:  # append-only: one line per decision
        f.write(json.dumps(decision, sort_keys=True) + "\n")


@task
def publish_dump(params: Params, manifest: dict, decision: dict) -> Path:
    """Copy the finished dump and its model into a new version folder, then switch `current`."""
    out_dir, root = params.dataset_dir(), published_root(params)
    dump = out_dir / "candidates"
    version = f"v{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{manifest['fingerprint'][:8]}"
    tmp = root / f".tmp-{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    for shard in manifest["shards"]:
        _link_or_copy(dump / shard["file"], tmp / shard["file"])
    sources = {"items.parquet": published_paths(out_dir)["items.parquet"]}
    for rel in bundle_files(manifest["method"]):
        _link_or_copy(sources.get(rel, out_dir / rel), tmp / "model" / rel)
    io.write_json(tmp / PROMOTION, {**decision, "version": version})
    shutil.copy2(dump / "manifest.json", tmp / "manifest.json")  # last: a version with a manifest is whole
    io.fsync_path(tmp)
    os.rename(tmp, root / version)
    switch_current(root, version)
    return root / version


PUBLICATION = "## Publication"


def append_publication(report: Path, decision: dict, published: Path | None) -> None:
    """The decision as the last section of the run report (replacing an earlier run's)."""
    if not report.is_file():
        return
    text = report.read_text(encoding="utf-8").split(f"\n{PUBLICATION}\n")[0].rstrip("\n")
    verdict = f"published as `{published}`" if published else "**refused**: the earlier dump stays published"
    io.write_text(report, f"{text}\n\n{PUBLICATION}\n\nThe {decision['method']} dump was {verdict}. "
                          f"{decision['reason']}.\n")
