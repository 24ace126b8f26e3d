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


# GOOD with one more hit: user 4 (rank 0 in GOOD) at rank 4, so R@10 6/8 against 5/8.
ONE_MORE = np.array([1, 2, 3, 4, 5, 11, 0, 1])


def test_the_default_champion_stays_unless_a_higher_method_is_significant():
    # ONE_MORE - GOOD is +1/8 from one user of 8: a resample misses that user with probability
    # (7/8)^8 = 0.34, so the two-sided p is about 0.69 > 0.05 and the default is kept.
    board = leaderboard({"good": GOOD, "more": ONE_MORE}, beam=20, n_boot=400, seed=0, default="good")
    assert [m["method"] for m in board["methods"]] == ["more", "good"]  # the table still orders by R@10
    assert board["champion"] == "good" and board["default"]["replaced"] is False
    assert board["default"]["challenger"] == "more"
    challenge = board["default"]["challenge"]["recall@10"]
    assert challenge["diff"] == pytest.approx(1 / 8) and 0.5 < challenge["p_value"] < 0.9
    # the margin is the champion against the best other method: negative here
    assert board["runner_up"] == "more" and board["margin"]["recall@10"]["diff"] == pytest.approx(-1 / 8)
    assert "good unless" in board["rule"]
    # with champion_p 1 any higher recall replaces it
    loose = leaderboard({"good": GOOD, "more": ONE_MORE}, beam=20, n_boot=400, seed=0, default="good", challenge_p=1.0)
    assert loose["champion"] == "more" and loose["default"]["replaced"] is True


def test_a_significant_challenger_replaces_the_default_and_a_missing_default_leaves_the_plain_rule():
    # GOOD - WEAK: +5/8, every resample positive, p = 0
    board = leaderboard({"weak": WEAK, "good": GOOD}, beam=20, n_boot=200, seed=0, default="weak")
    assert board["champion"] == "good" and board["default"]["replaced"] is True
    assert board["default"]["challenge"]["recall@10"]["p_value"] == 0.0
    assert board["runner_up"] == "weak" and board["margin"]["recall@10"]["diff"] == pytest.approx(5 / 8)
    # the default on top: no challenge, kept
    top = leaderboard({"weak": WEAK, "good": GOOD}, beam=20, n_boot=200, seed=0, default="good")
    assert top["champion"] == "good" and top["default"]["replaced"] is False and "challenge" not in top["default"]
    # a default that was not ranked: the highest validation recall wins, and the board says so
    missing = leaderboard({"weak": WEAK, "good": GOOD}, beam=20, n_boot=200, seed=0, default="tiger_cf")
    assert missing["champion"] == "good" and missing["default"] == {"method": "tiger_cf", "challenge_p": 0.05,
                                                                    "ranked": False}
    assert missing["rule"] == "highest validation recall@10, then ndcg@10"


def test_the_weight_with_the_best_validation_recall_then_ndcg_then_the_smaller_is_chosen():
    from grc_core.metrics import choose_weight

    # R@10: w 1 -> 1/4, w 2 -> 2/4 (hits at ranks 1 and 9), w 8 -> 2/4 (ranks 1 and 2: more NDCG)
    tried = {1.0: np.array([1, 0, 0, 0]), 2.0: np.array([1, 9, 0, 0]), 8.0: np.array([1, 2, 0, 0])}
    out = choose_weight(tried)
    assert out["chosen"] == 8.0 and out["weights"] == [1.0, 2.0, 8.0] and out["users"] == 4
    assert [r["recall@10"] for r in out["valid"]] == [0.25, 0.5, 0.5]
    # an exact tie on both goes to the smaller weight, wherever it is listed
    assert choose_weight({4.0: np.array([3, 0]), 2.0: np.array([3, 0])})["chosen"] == 2.0
    with pytest.raises(ValueError, match="no weight"):
        choose_weight({})


def test_tiger_cf_weight_is_the_one_value_or_evaluates_choice_and_refuses_a_stale_one(tmp_path):
    from tasks import io
    from tasks.artifacts import tiger_cf_weight

    assert tiger_cf_weight(tmp_path, (2.0,)) == 2.0  # one value: no leaderboard needed
    with pytest.raises(FileNotFoundError, match="leaderboard.json does not exist; run the evaluate stage first"):
        tiger_cf_weight(tmp_path, (1.0, 4.0))
    path = tmp_path / "eval" / "leaderboard.json"
    io.write_json(path, {"champion": "sasrec"})
    with pytest.raises(ValueError, match="no field tiger_cf_weight"):
        tiger_cf_weight(tmp_path, (1.0, 4.0))
    io.write_json(path, {"tiger_cf_weight": {"weights": [1.0, 4.0], "chosen": 4.0}})
    assert tiger_cf_weight(tmp_path, (1.0, 4.0)) == 4.0
    with pytest.raises(ValueError, match=r"chosen among \[1.0, 4.0\], not among this run's evaluate.cf_weights"):
        tiger_cf_weight(tmp_path, (1.0, 2.0, 4.0))
