"""Evaluate tasks: rank the full catalog for every test user, score it, record it.

Per method: `data/<dataset>/eval/<method>.parquet` keeps each user's target rank (0 = not
in the top `evaluate.beam`) for paired tests between methods; `reports/<dataset>/metrics.json`
holds every method's metrics with bootstrap intervals; each evaluated method appends one
record to `benchmarks/results/quality.jsonl`.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import torch
from prefect import task
from tqdm.auto import tqdm

from grc_core import metrics as M
from grc_core.device import resolve_device
from grc_core.evaluation import ReflectionStats
from tasks import io
from tasks.artifacts import (GRC_METHODS, check_ensemble, decode_config, decode_identity, load_ranker, load_split,
                             subset, tiger_cf_weight)
from tasks.env import PROJECT_ROOT
from tasks.params import Params

QUALITY_LOG = PROJECT_ROOT / "benchmarks" / "results" / "quality.jsonl"


@task
def rank_users(params: Params, method: str, split: str = "test",
               cf_weight: float | None = None) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """(user ids (U,), 1-based target ranks (U,), wall seconds, extra stats) for one method on the
    test split (`evaluate.users` of them) or the validation split (`evaluate.valid_users`).
    `cf_weight`: tiger_cf's w; None takes the one chosen on validation (`tiger_cf_weight`)."""
    out_dir, ev = params.dataset_dir(), params.evaluate
    check_ensemble(out_dir, params.sasrec_ensemble.seeds, method)
    if cf_weight is None:
        cf_weight = tiger_cf_weight(out_dir, ev.cf_weights) if method == "tiger_cf" else 0.0
    n_users = {"test": ev.users, "valid": ev.valid_users}[split]
    test = subset(load_split(out_dir, split, params.data.max_history), n_users, ev.users_seed)
    t0 = time.perf_counter()
    rank = load_ranker(method, out_dir, params.dataset.attributes, resolve_device(ev.device),
                       decode_config(ev, ev.beam, params.vstar.ved_test), ev.batch_size, params.data.exclude_history,
                       cf_weight)
    stats = ReflectionStats() if method in GRC_METHODS else None
    desc = f"{method} {split} beam {ev.beam}" + (f" w {cf_weight:g}" if method == "tiger_cf" else "")
    with tqdm(total=len(test), unit="user", desc=desc, mininterval=5) as bar:
        ranked, _ = rank(test, bar.update, stats)
    extra: dict = {"cf_weight": cf_weight} if method == "tiger_cf" else {}
    if stats is not None:
        extra = {"reflection": stats.summary(), "alpha_e": ev.alpha_e, "rank_rule": ev.rank_rule,
                 "reflect_width": ev.reflect_width or ev.beam, "correct_width": ev.correct_width or ev.beam}
    ranks = M.target_ranks(ranked, test.target.numpy())
    return test.user.numpy(), ranks, time.perf_counter() - t0, extra


def rank_or_reuse(params: Params, method: str, split: str, done: dict, rank=rank_users) -> tuple:
    """`rank(params, method, split)` (the `rank_users` task), unless a method ranked before on this
    split decodes the same model alike (`done`: decode identity -> (method, result), filled here):
    then that method's users and ranks, 0 s, and `same_ranks_as` naming it in the extra stats."""
    identity = decode_identity(params.dataset_dir(), method)
    if identity in done:
        source, (users, ranks, _, extra) = done[identity]
        return users, ranks, 0.0, {**extra, "same_ranks_as": source}
    result = rank(params, method, split)
    if identity is not None:
        done[identity] = (method, result)
    return result


def summarize_method(ranks: np.ndarray, beam: int, n_boot: int, seed: int) -> dict:
    """Metrics at the cut-offs the beam can answer (a beam of 20 says nothing about Recall@100)."""
    ks = tuple(k for k in M.DEFAULT_KS if k <= beam)
    per_user = M.per_user_metrics(ranks, ks, tuple(k for k in M.NDCG_KS if k <= beam))
    summary = M.summarize(per_user)
    intervals = {k: M.bootstrap_interval(v, n_boot, seed) for k, v in per_user.items()}
    return {"metrics": summary, "ci95": intervals, "users": int(len(ranks))}


def ranks_dir(out_dir: Path, split: str = "test", root: str = "eval") -> Path:
    """The folder of a split's per-user rank files: `<root>/` for test, `<root>/<split>/` otherwise;
    `root` another folder than `eval/` for a benchmark's ranks (`benchmarks.seeds_table --eval-subdir`)."""
    return out_dir / root if split == "test" else out_dir / root / split


def save_ranks(out_dir: Path, method: str, users: np.ndarray, ranks: np.ndarray, split: str = "test",
               root: str = "eval") -> None:
    """Per-user target ranks: `eval/<method>.parquet` (test), `eval/valid/<method>.parquet` (validation),
    or under another `root` (`ranks_dir`)."""
    io.write_parquet(ranks_dir(out_dir, split, root) / f"{method}.parquet",
                     pl.DataFrame({"user_id": users.astype(np.int64), "rank": ranks.astype(np.int64)}))


def leaderboard(ranks: dict[str, np.ndarray], beam: int, n_boot: int, seed: int, default: str = "",
                challenge_p: float = 0.05) -> dict:
    """Methods ordered by validation Recall@10, then NDCG@10 (a tie keeps `ranks`' order), and the
    champion among them. `ranks[m]` are method m's 1-based target ranks of the same validation
    users, in the same order.

    The champion is `default` (`evaluate.champion_default`) unless the first method beats it: a
    higher validation Recall@10 whose paired bootstrap against `default` has p < `challenge_p`.
    Without a default, or when it was not ranked, the champion is the first method. The margin is
    the champion against the runner-up (the best other method) on the same users; with a default
    kept over a higher but not significant challenger it is negative."""
    if not ranks:
        raise ValueError("leaderboard: no method was ranked on the validation split")
    lengths = {m: len(r) for m, r in ranks.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"leaderboard: methods ranked different numbers of validation users: {lengths}")
    rows = []
    for method, r in ranks.items():
        s = summarize_method(r, beam, n_boot, seed)
        rows.append({"method": method, "metrics": s["metrics"], "ci95": s["ci95"]})
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["metrics"]["recall@10"], -rows[i]["metrics"]["ndcg@10"], i))
    rows = [rows[i] for i in order]
    per_user = {m: M.per_user_metrics(r, (10,), (10,)) for m, r in ranks.items()}

    def paired(base: str, method: str) -> dict:  # method - base, per user
        return {k: M.paired_bootstrap(per_user[base][k], per_user[method][k], n_boot, seed)
                for k in ("recall@10", "ndcg@10")}

    best = rows[0]["method"]
    board = {"split": "valid", "rule": "highest validation recall@10, then ndcg@10", "champion": best,
             "users": next(iter(lengths.values())), "methods": rows}
    if default:
        board["default"] = {"method": default, "challenge_p": challenge_p, "ranked": default in ranks}
    if default in ranks:
        board["rule"] = (f"{default} unless a method's validation recall@10 is higher with paired p < {challenge_p:g}; "
                         f"that method if so")
        if best != default:
            challenge = paired(default, best)
            d = challenge["recall@10"]
            board["champion"] = best if d["diff"] > 0 and d["p_value"] < challenge_p else default
            board["default"].update(challenger=best, challenge=challenge)
        board["default"]["replaced"] = board["champion"] != default
    if len(rows) > 1:
        runner_up = next(r["method"] for r in rows if r["method"] != board["champion"])
        board["runner_up"], board["margin"] = runner_up, paired(runner_up, board["champion"])
    return board


def paired_against(out_dir: Path, base: str, method: str, n_boot: int, seed: int) -> dict:
    """Paired bootstrap of `method` against `base` over the users both were evaluated on.

    Also gives `base`'s metrics on exactly those users (`base_metrics`), for tables where a
    method was evaluated on a subset (`evaluate.users`).
    """
    a = io.read_parquet(out_dir / "eval" / f"{base}.parquet")
    b = io.read_parquet(out_dir / "eval" / f"{method}.parquet")
    both = b.join(a, on="user_id", how="inner", suffix="_base").sort("user_id")
    if both.height == 0:
        raise ValueError(f"no user in common between the {base} and {method} rank files under {out_dir / 'eval'}")
    ra, rb = both["rank_base"].to_numpy(), both["rank"].to_numpy()
    pa, pb = M.per_user_metrics(ra, M.NDCG_KS), M.per_user_metrics(rb, M.NDCG_KS)
    out = {k: M.paired_bootstrap(pa[k], pb[k], n_boot, seed) for k in pa}
    full_a = M.per_user_metrics(ra, M.DEFAULT_KS, M.NDCG_KS)
    out["base_metrics"] = M.summarize(full_a)
    out["users"] = int(both.height)
    return out


def command_line() -> str:
    """The command as typed: `python -m flows.evaluate -S ...` rather than the module's file path."""
    argv = list(sys.argv)
    script = Path(argv[0])
    if script.suffix == ".py" and PROJECT_ROOT in script.resolve().parents:
        module = ".".join(script.resolve().relative_to(PROJECT_ROOT).with_suffix("").parts)
        argv = ["python", "-m", module, *argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)


def append_quality_record(params: Params, method: str, summary: dict, wall_s: float, seed: int) -> dict:
    record = {
        "dataset": params.data.dataset, "method": method, "seed": seed,
        "metrics": {k: round(v, 6) for k, v in summary["metrics"].items()},
        **{k: summary[k] for k in ("cf_weight", "same_ranks_as") if k in summary},
        "params_hash": params.section_hash(), "command": command_line(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_s": round(wall_s, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
    }
    QUALITY_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(QUALITY_LOG, "a", encoding="utf-8") as f:  # append-only log: one line per evaluated run
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return record
