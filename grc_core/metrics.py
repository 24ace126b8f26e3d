"""Leave-one-out ranking metrics over a full-catalog ranked list per user.

With one held-out target per user, Recall@K is the hit rate (target in the top K) and
NDCG@K is 1/log2(rank+1) for a hit at 1-based `rank`, else 0 (the ideal DCG is 1).
Per-user values are kept so methods can be compared with paired tests.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (5, 10, 100, 200)
NDCG_KS = (5, 10)


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target in its row of `ranked` (B, K); 0 where it is absent.

    Rows may be padded with -1 (fewer than K valid items); a padded slot never matches.
    """
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.ndim != 2 or targets.shape != (ranked.shape[0],):
        raise ValueError(f"ranked must be (B, K) and targets (B,), got {ranked.shape} and {targets.shape}")
    if (targets < 0).any():  # -1 would match the padding
        raise ValueError(f"targets must be item ids >= 0, got {targets[targets < 0][:5].tolist()}")
    hit = ranked == targets[:, None]  # (B, K)
    first = hit.argmax(axis=1)  # (B,)
    return np.where(hit.any(axis=1), first + 1, 0)


def per_user_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                     ndcg_ks: Sequence[int] = NDCG_KS) -> dict[str, np.ndarray]:
    """recall@k and ndcg@k per user from 1-based target ranks (0 = not retrieved)."""
    ranks = np.asarray(ranks)
    hit = ranks > 0
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"recall@{k}"] = (hit & (ranks <= k)).astype(np.float64)
    for k in ndcg_ks:
        gain = np.zeros(ranks.shape, dtype=np.float64)
        ok = hit & (ranks <= k)
        gain[ok] = 1.0 / np.log2(ranks[ok] + 1.0)
        out[f"ndcg@{k}"] = gain
    return out


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in per_user.items()}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean difference b - a over users, its 95% bootstrap interval and a two-sided p-value."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be 1-d of equal length, got {a.shape} and {b.shape}")
    diff = b - a
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)  # (n_boot,)
    p = 2.0 * min((means <= 0).mean(), (means >= 0).mean())
    return {"diff": float(diff.mean()), "ci_low": float(np.quantile(means, 0.025)),
            "ci_high": float(np.quantile(means, 0.975)), "p_value": float(min(1.0, p))}


def bootstrap_interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def choose_weight(ranks: dict[float, np.ndarray]) -> dict:
    """The weight whose validation ranks (`ranks[w]`, 1-based, the same users in the same order)
    have the best Recall@10, then NDCG@10, then the smaller weight; with every weight's metrics
    (the evaluate leaderboard's `tiger_cf_weight`; the SASRec ensemble's weight, tasks/sasrec.py)."""
    if not ranks:
        raise ValueError("choose_weight: no weight was tried")
    rows = [{"weight": float(w), **{k: float(v.mean()) for k, v in per_user_metrics(r, (10,), (10,)).items()}}
            for w, r in ranks.items()]
    best = min(rows, key=lambda r: (-r["recall@10"], -r["ndcg@10"], r["weight"]))
    return {"weights": [float(w) for w in ranks], "chosen": best["weight"], "users": int(len(next(iter(ranks.values())))),
            "rule": "highest validation recall@10, then ndcg@10, then the smaller weight", "valid": rows}
