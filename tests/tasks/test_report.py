import json

import numpy as np
import polars as pl

from tasks.params import load_params
from tasks.report import recall_curves, write_report


def test_recall_curves_count_hits_at_every_k(tmp_path):
    (tmp_path / "eval").mkdir()
    pl.DataFrame({"user_id": [0, 1, 2, 3], "rank": [1, 3, 0, 200]}).write_parquet(tmp_path / "eval" / "tiger.parquet")
    c = recall_curves(tmp_path / "eval")["tiger"]
    assert c[0] == 0.25 and c[1] == 0.25 and c[2] == 0.5 and c[198] == 0.5 and c[199] == 0.75


def test_report_has_the_table_the_plots_and_says_what_is_missing(tmp_path):
    params = load_params(None, [f"data.data_dir={tmp_path / 'data'}", f"data.reports_dir={tmp_path / 'reports'}"])
    ds, rep = params.dataset_dir(), params.reports_dir()
    (ds / "eval").mkdir(parents=True)
    rep.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for m in ("tiger", "grc_sft"):
        pl.DataFrame({"user_id": np.arange(50), "rank": rng.integers(0, 201, 50)}).write_parquet(ds / "eval" / f"{m}.parquet")
    metrics = {"dataset": "ml-100k", "beam": 200, "methods": {
        "tiger": {"metrics": {"recall@10": 0.1, "ndcg@10": 0.05}, "users": 50},
        "grc_sft": {"metrics": {"recall@10": 0.12, "ndcg@10": 0.06}, "users": 50,
                    "reflection": {"acc_loc@5": 0.9, "entropy_hist": {"edges": [0.0, 0.5, 1.0], "counts": [3, 4]}},
                    "vs_tiger": {"recall@10": {"diff": 0.02, "p_value": 0.3}, "ndcg@10": {"diff": 0.01, "p_value": 0.4},
                                 "users": 50}}}}
    (rep / "metrics.json").write_text(json.dumps(metrics))
    (rep / "backbone_log.csv").write_text("epoch,valid_recall@10\n1,0.05\n2,0.08\n")
    path = write_report(params)
    text = path.read_text()
    assert "| grc_sft | 50 | 0.0600 | 0.1200 |" in text
    assert "grc_sft − TIGER on the same 50 users: recall@10 +0.0200 (p=0.300)" in text
    assert "acc_loc@5 0.900" in text
    for fig in ("recall_at_k.png", "reflection_entropy.png", "training.png"):
        data = (rep / "figures" / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"figures/{fig}" in text
    assert "r_loc distribution (no mine.json)" in text  # said, not silently dropped


def test_a_kept_default_champion_is_reported_against_the_higher_method():
    from tasks.evaluate import leaderboard
    from tasks.report import leaderboard_lines
    from tasks.ui import champion_entry, leaderboard_rows

    good = np.array([1, 2, 3, 0, 5, 11, 0, 1])  # R@10 5/8
    more = np.array([1, 2, 3, 4, 5, 11, 0, 1])  # 6/8: one user more, not significant on 8 users
    board = leaderboard({"tiger_cf": good, "tiger": more}, beam=20, n_boot=200, seed=0, default="tiger_cf")
    assert board["champion"] == "tiger_cf" and champion_entry(board)["metrics"]["recall@10"] == 5 / 8
    text = "\n".join(leaderboard_lines(board))
    assert "## Champion on the validation split: tiger_cf" in text
    assert "tiger_cf − tiger (paired, validation R@10): -0.1250" in text
    assert "tiger − the default tiger_cf (paired, validation R@10): +0.1250" in text and "does not replace it" in text
    rows = {r["method"]: r for r in leaderboard_rows(board, {})}
    # differences are against the champion's 5/8, not the first row's 6/8
    assert rows["tiger_cf"]["valid recall@10 - champion"] == "0.0000"
    assert rows["tiger"]["valid recall@10 - champion"].startswith("0.1250 (paired p ")


def test_the_report_says_which_weight_tiger_cf_decodes_with():
    from grc_core.metrics import choose_weight
    from tasks.evaluate import leaderboard
    from tasks.report import leaderboard_lines

    tried = {1.0: np.array([1, 0, 0, 0]), 4.0: np.array([1, 2, 0, 0])}  # R@10 1/4 and 2/4
    board = leaderboard({"tiger_cf": tried[4.0]}, beam=20, n_boot=50, seed=0)
    board["tiger_cf_weight"] = choose_weight(tried)
    text = "\n".join(leaderboard_lines(board))
    assert "tiger_cf decodes with w = 4, chosen on the same validation users (R@10 per w: 1: 0.2500, 4: 0.5000)" in text


def test_the_report_says_which_ensemble_steers_tiger_cf():
    from grc_core.metrics import choose_weight
    from tasks.evaluate import leaderboard
    from tasks.report import leaderboard_lines

    tried = {0.5: np.array([1, 2, 0, 0]), 2.0: np.array([1, 0, 0, 0])}  # R@10 2/4 and 1/4
    board = leaderboard({"tiger_cf": tried[0.5]}, beam=20, n_boot=50, seed=0)
    assert not any("ensemble" in line for line in leaderboard_lines(board))  # none without one
    board["sasrec_ensemble"] = {"seeds": [2126, 2226], "weight": 0.5, "choice": choose_weight(tried)}
    text = "\n".join(leaderboard_lines(board))
    assert ("The SASRec ensemble (further seeds 2126, 2226) enters with w = 0.5, chosen by the sasrec stage on every "
            "validation user (R@10 per w: 0.5: 0.5000, 2: 0.2500)") in text
