"""grc_core.metrics: every reported Recall@K / NDCG@K and every paired test rests on these."""

from __future__ import annotations

import numpy as np
import pytest

from grc_core import metrics as M


def test_target_ranks_on_a_tiny_ranked_matrix():
    ranked = np.array([[7, 3, 9, -1],    # 9 in the 3rd slot -> rank 3
                       [2, 5, -1, -1],   # 8 absent -> 0
                       [4, 4, 8, 1],     # 4 twice -> the first, rank 1
                       [6, 0, 2, 3],     # item 0 is an item like any other: rank 2
                       [-1, -1, -1, -1]])  # nothing decoded -> 0
    targets = np.array([9, 8, 4, 0, 5])
    ranks = M.target_ranks(ranked, targets)
    assert ranks.tolist() == [3, 0, 1, 2, 0]
    assert ranks.dtype.kind == "i"


def test_target_ranks_finds_the_last_slot_and_a_padded_slot_never_matches():
    ranked = np.array([[5, 6, 7], [5, -1, -1]])
    assert M.target_ranks(ranked, np.array([7, 6])).tolist() == [3, 0]


def test_a_negative_target_is_refused_rather_than_matched_to_padding():
    # Before the guard, target -1 "hit" the padding at slot 2: rank 2, Recall@10 = 1 for a user
    # whose target was never decoded.
    with pytest.raises(ValueError, match="targets must be item ids >= 0"):
        M.target_ranks(np.array([[5, -1]]), np.array([-1]))


@pytest.mark.parametrize("ranked, targets", [
    (np.array([1, 2, 3]), np.array([1])),         # ranked 1-d
    (np.array([[1, 2], [3, 4]]), np.array([1])),  # one target for two rows
    (np.array([[1, 2]]), np.array([[1]])),        # targets (B, 1)
])
def test_target_ranks_refuses_mismatched_shapes(ranked, targets):
    with pytest.raises(ValueError, match=r"ranked must be \(B, K\) and targets \(B,\)"):
        M.target_ranks(ranked, targets)


def test_recall_and_ndcg_at_10_from_ranks():
    m = M.per_user_metrics(np.array([1, 3, 0, 11]), ks=(10,), ndcg_ks=(10,))
    assert set(m) == {"recall@10", "ndcg@10"}
    # hits at ranks 1 and 3; rank 0 is "not in the list", rank 11 is past the cut-off.
    assert m["recall@10"].tolist() == [1.0, 1.0, 0.0, 0.0]
    # 1/log2(1+1) = 1, 1/log2(3+1) = 1/2
    assert m["ndcg@10"].tolist() == [1.0, 0.5, 0.0, 0.0]
    s = M.summarize(m)
    assert s["recall@10"] == 0.5  # 2/4
    assert s["ndcg@10"] == 0.375  # (1 + 1/2) / 4


def test_each_cut_off_counts_its_own_hits():
    m = M.summarize(M.per_user_metrics(np.array([1, 3, 0, 11, 7]), ks=(5, 10, 100), ndcg_ks=(5, 10)))
    assert m["recall@5"] == pytest.approx(0.4, abs=1e-12)    # ranks 1, 3: 2/5
    assert m["recall@10"] == pytest.approx(0.6, abs=1e-12)   # + rank 7: 3/5
    assert m["recall@100"] == pytest.approx(0.8, abs=1e-12)  # + rank 11: 4/5
    assert m["ndcg@5"] == pytest.approx(0.3, abs=1e-12)      # (1 + 1/log2 4) / 5 = 1.5 / 5
    assert m["ndcg@10"] == pytest.approx(11 / 30, abs=1e-12)  # (1 + 1/2 + 1/log2 8) / 5 = (11/6) / 5


def test_a_rank_equal_to_k_is_a_hit_and_one_past_it_is_not():
    m = M.per_user_metrics(np.array([5, 6, 10, 11]), ks=(5, 10), ndcg_ks=(5, 10))
    assert m["recall@5"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert m["recall@10"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert m["ndcg@5"] == pytest.approx([0.386853, 0, 0, 0], abs=1e-6)  # 1/log2 6 = 1/2.584963
    # 1/log2 6, 1/log2 7 = 1/2.807355, 1/log2 11 = 1/3.459432
    assert m["ndcg@10"] == pytest.approx([0.386853, 0.356207, 0.289065, 0], abs=1e-6)


def test_default_cut_offs_and_a_miss_scores_zero_everywhere():
    m = M.per_user_metrics(np.array([0, 0, 200, 201]))
    assert set(m) == {"recall@5", "recall@10", "recall@100", "recall@200", "ndcg@5", "ndcg@10"}
    for key, per_user in m.items():
        assert per_user.dtype == np.float64 and per_user.shape == (4,), key
        assert per_user[:2].tolist() == [0.0, 0.0], key  # rank 0 is never a hit, though 0 <= k
    assert m["recall@200"].tolist() == [0.0, 0.0, 1.0, 0.0]  # 200 <= 200 < 201


def test_target_ranks_feed_the_metrics():
    ranked = np.array([[4, 8, 2], [1, 2, 3], [9, -1, -1]])
    ranks = M.target_ranks(ranked, np.array([8, 7, 9]))  # [2, 0, 1]
    s = M.summarize(M.per_user_metrics(ranks, ks=(1, 3), ndcg_ks=(3,)))
    assert s["recall@1"] == pytest.approx(1 / 3, abs=1e-12)  # only user 3 at rank 1
    assert s["recall@3"] == pytest.approx(2 / 3, abs=1e-12)
    # (1/log2 3 + 0 + 1) / 3 = (0.630930 + 1) / 3
    assert s["ndcg@3"] == pytest.approx(0.543643, abs=1e-6)


def test_summarize_gives_plain_float_means():
    s = M.summarize({"recall@10": np.array([1.0, 1.0, 0.0, 0.0]), "ndcg@10": np.array([1.0, 0.5, 0.0, 0.0])})
    assert s == {"recall@10": 0.5, "ndcg@10": 0.375}
    assert all(type(v) is float for v in s.values())  # json.dumps-able


def test_bootstrap_interval_of_constant_data_is_a_point():
    assert M.bootstrap_interval(np.full(8, 0.25)) == (0.25, 0.25)  # every resample mean is 2.0 / 8


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    values = np.arange(20, dtype=np.float64)  # mean 9.5
    lo, hi = M.bootstrap_interval(values, n_boot=500, seed=3)
    assert 0.0 <= lo < 9.5 < hi <= 19.0
    assert M.bootstrap_interval(values, n_boot=500, seed=3) == (lo, hi)
    assert M.bootstrap_interval(values, n_boot=500, seed=4) != (lo, hi)


def test_bootstrap_interval_has_the_normal_width_for_a_fair_coin():
    # 400 users, half hits: standard error sqrt(0.5 * 0.5 / 400) = 0.025, so a 95% interval is
    # about 0.5 +- 1.96 * 0.025 = [0.451, 0.549], width 0.098. A 50% interval would be ~0.034 wide.
    values = np.tile([0.0, 1.0], 200)
    lo, hi = M.bootstrap_interval(values, n_boot=2000, seed=0)
    assert abs((lo + hi) / 2 - 0.5) <= 0.005
    assert abs((hi - lo) - 0.098) <= 0.01


def test_paired_bootstrap_of_identical_methods_finds_no_difference():
    a = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.5])
    out = M.paired_bootstrap(a, a.copy())
    # every resampled difference is 0: P(mean <= 0) = P(mean >= 0) = 1, p = min(1, 2 * 1) = 1
    assert out == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}


def test_paired_bootstrap_resamples_users_in_pairs():
    # b is a shifted by 0.25 for every user: each resample's mean difference is 0.25, so the
    # interval is a point. Resampling a and b independently would give roughly +-0.37 (a's spread).
    a = np.arange(10) / 10
    up = M.paired_bootstrap(a, a + 0.25)
    assert up["diff"] == pytest.approx(0.25, abs=1e-12)
    assert up["ci_low"] == pytest.approx(0.25, abs=1e-12) and up["ci_high"] == pytest.approx(0.25, abs=1e-12)
    assert up["p_value"] == 0.0  # no resample has mean <= 0
    down = M.paired_bootstrap(a, a - 0.25)
    assert down["diff"] == pytest.approx(-0.25, abs=1e-12) and down["ci_high"] < 0
    assert down["p_value"] == 0.0


def test_paired_bootstrap_p_value_by_hand():
    # Two users, differences b - a = [1, 0]. A resample of two users has mean 0 (both user 2)
    # with probability 1/4, 0.5 with 1/2, 1 with 1/4. P(mean <= 0) = 1/4, P(mean >= 0) = 1,
    # so p = 2 * 1/4 = 0.5; the 2.5% and 97.5% quantiles fall inside the 1/4 masses at 0 and 1.
    # Monte Carlo error of p at 4000 resamples: 2 * sqrt(0.25 * 0.75 / 4000) = 0.014.
    out = M.paired_bootstrap(np.array([0.0, 0.0]), np.array([1.0, 0.0]), n_boot=4000, seed=0)
    assert out["diff"] == 0.5
    assert out["ci_low"] == 0.0 and out["ci_high"] == 1.0
    assert abs(out["p_value"] - 0.5) <= 0.04


def test_paired_bootstrap_is_seeded():
    rng = np.random.default_rng(7)
    a, b = rng.random(30), rng.random(30)
    assert M.paired_bootstrap(a, b, n_boot=300, seed=1) == M.paired_bootstrap(a, b, n_boot=300, seed=1)
    assert M.paired_bootstrap(a, b, n_boot=300, seed=1) != M.paired_bootstrap(a, b, n_boot=300, seed=2)


@pytest.mark.parametrize("a, b", [
    (np.zeros(3), np.zeros(4)),
    (np.zeros((2, 2)), np.zeros((2, 2))),
])
def test_paired_bootstrap_refuses_unpaired_samples(a, b):
    with pytest.raises(ValueError, match="paired samples must be 1-d of equal length"):
        M.paired_bootstrap(a, b)
