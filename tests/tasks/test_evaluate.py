"""The validation leaderboard that picks the champion (tasks/evaluate.py `leaderboard`)."""

import numpy as np
import pytest

from tasks.evaluate import leaderboard

# 1-based target ranks of 8 validation users (0: not in the list).
GOOD = np.array([1, 2, 3, 0, 5, 11, 0, 1])  # R@10 = 5/8, N@10 = (1 + 1/log2(3) + 1/2 + 1/log2(6) + 1)/8
WEAK = np.zeros(8, dtype=np.int64)  # never a hit


def test_the_champion_has_the_best_validation_recall_wherever_it_is_listed():
    board = leaderboard({"weak": WEAK, "good": GOOD}, beam=20, n_boot=200, seed=0)
    assert board["champion"] == "good" and [m["method"] for m in board["methods"]] == ["good", "weak"]
    assert board["methods"][0]["metrics"]["recall@10"] == pytest.approx(5 / 8)
    ndcg = (1 + 1 / np.log2(3) + 1 / 2 + 1 / np.log2(6) + 1) / 8
    assert board["methods"][0]["metrics"]["ndcg@10"] == pytest.approx(ndcg)
    # champion - runner-up on the same users: +5/8 in R@10; every resample keeps the sign, so p = 0
    assert board["runner_up"] == "weak" and board["users"] == 8
    assert board["margin"]["recall@10"]["diff"] == pytest.approx(5 / 8)
    assert board["margin"]["recall@10"]["p_value"] == 0.0


def test_a_recall_tie_goes_to_ndcg_then_to_the_listed_order():
    later = np.array([2, 2, 3, 0, 5, 11, 0, 2])  # the same hits at R@10, each a rank lower: smaller NDCG
    board = leaderboard({"later": later, "good": GOOD}, beam=20, n_boot=50, seed=0)
    assert board["champion"] == "good"
    same = leaderboard({"b": GOOD.copy(), "a": GOOD.copy()}, beam=20, n_boot=50, seed=0)
    assert same["champion"] == "b" and same["margin"]["recall@10"]["diff"] == 0.0


def test_one_method_has_no_margin_and_mismatched_users_are_refused():
    alone = leaderboard({"good": GOOD}, beam=20, n_boot=50, seed=0)
    assert alone["champion"] == "good" and "margin" not in alone
    with pytest.raises(ValueError, match="different numbers of validation users"):
        leaderboard({"good": GOOD, "short": GOOD[:5]}, beam=20, n_boot=50, seed=0)
    with pytest.raises(ValueError, match="no method"):
        leaderboard({}, beam=20, n_boot=50, seed=0)
