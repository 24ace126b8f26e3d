"""benchmarks.fusion_ceiling: the re-rankers find a planted per-user signal and nothing else."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.fusion_ceiling import entropy, hits_and_gains, rerank, stacker_features


def planted(users: int = 2000, width: int = 100, seed: int = 0) -> dict:
    """Candidates whose target TIGER scores high for long histories and SASRec for short ones."""
    rng = np.random.default_rng(seed)
    items = np.stack([rng.permutation(1000)[:width] for _ in range(users)])  # (U, W)
    items[:, -1] = -1  # padding never ranks
    slot = rng.integers(0, width - 1, users)
    targets = items[np.arange(users), slot]
    hist_len = rng.choice([2, 50], users)
    logpi, sas = rng.normal(size=(users, width)), rng.normal(size=(users, width))
    long = hist_len == 50
    logpi[np.arange(users)[long], slot[long]] += 2.5
    sas[np.arange(users)[~long], slot[~long]] += 2.5
    return {"items": items, "logpi": logpi, "sas": sas, "targets": targets, "hist_len": hist_len,
            "sas_top": -np.sort(-np.where(items >= 0, sas, -np.inf), 1), "sas_entropy": rng.normal(size=users)}


def test_entropy_by_hand():
    with np.errstate(divide="ignore"):
        logp = np.log(np.array([[0.25, 0.25, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]))  # -inf: no mass
    assert entropy(logp) == pytest.approx([-(0.5 * math.log(0.25) + 0.5 * math.log(0.5)), 0.0])


def test_stacker_features_rank_candidates_among_sasrecs_top():
    c = {"items": np.array([[5, 7, -1]]), "logpi": np.array([[-1.0, -2.0, 0.0]]),
         "sas": np.array([[-3.0, -0.5, 0.0]]), "sas_top": np.array([[-0.1, -0.5, -3.0]])}
    x = stacker_features(c, {"f": np.array([2.0])})
    assert x.shape == (1, 3, 6)
    assert x[0, :2, 3] == pytest.approx(np.log1p([2, 1]))  # -3 has two above it, -0.5 one
    assert x[0, :2, 2] == pytest.approx(np.log1p([0, 1]))  # beam position
    assert x[0, 0, 4] == pytest.approx(-2.0) and x[0, 1, 5] == pytest.approx(-1.0)  # feature x log pi, x log p


def test_rerankers_find_the_planted_per_user_weight_and_read_it_on_held_out_users():
    c = planted()
    fit = np.random.default_rng(1).permutation(len(c["targets"])) < len(c["targets"]) // 2
    scores, chosen = rerank(c, fit, weight=1.0)
    check = ~fit

    def r10(name):
        return hits_and_gains(c["items"][check], scores[name][check], c["targets"][check])["recall@10"].mean()

    # a fixed weight must trade the two halves off; a weight that falls with the history length
    # (beta < 0) and the stacker serve both
    assert chosen["adaptive:log_history"]["beta"] < 0
    assert r10("adaptive:log_history") > r10("tiger_cf") + 0.05
    assert r10("stacker") > r10("tiger_cf") + 0.05
    assert chosen["stacker"]["log_history*log_p_sasrec"] < 0 < chosen["stacker"]["log_history*log_pi"]
    # a feature that carries nothing buys nothing on the held-out users
    assert abs(r10("adaptive:sas_entropy") - r10("final")) < 0.03
    assert (scores["tiger"] == c["logpi"]).all() and (scores["tiger_cf"] == c["logpi"] + c["sas"]).all()
