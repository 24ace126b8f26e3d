import numpy as np
import pytest

from benchmarks.dense_head import best, cross_fitted, same_run
from grc_core import metrics as M


def per_user(ranks: dict) -> dict:
    return {p: M.per_user_metrics(r, (10,), (10,)) for p, r in ranks.items()}


def test_best_takes_recall_then_ndcg_then_the_smaller_weights():
    ranks = {(0, 1): np.array([1, 50]), (0, 2): np.array([5, 50]), (1, 1): np.array([1, 50]), (0, 4): np.array([50, 50])}
    assert best(list(ranks), per_user(ranks)) == (0, 1)  # (0, 1) and (1, 1) tie: the smaller a + b
    assert best([(0, 2), (0, 4)], per_user(ranks)) == (0, 2)  # same recall, better N@10


def test_cross_fitting_reads_each_half_at_the_other_halfs_choice():
    # (0, 1) hits on one half of the users only and (0, 2) on the other: each half's choice is the
    # point that misses it, so the cross-fitted figure is 0, where choosing on all users reads 0.5.
    n = 40
    halves = np.array_split(np.random.default_rng(0).permutation(n), 2)
    one, two = np.full(n, 99), np.full(n, 99)
    one[halves[0]], two[halves[1]] = 1, 1
    ranks = {(0, 1): one, (0, 2): two}
    out, chosen = cross_fitted(list(ranks), ranks, per_user(ranks))
    assert chosen == [[0, 1], [0, 2]]
    assert (out <= 10).mean() == 0.0
    assert (ranks[best(list(ranks), per_user(ranks))] <= 10).mean() == 0.5


def test_a_base_of_another_run_is_refused(tmp_path):
    # The backbone stage's inputs (splits/ and tokenizer/ are folders) must be the same bytes.
    for run in ("dense", "base"):
        for rel in ("splits/train.parquet", "items.parquet", "tokenizer/semantic_ids.parquet",
                    "sasrec/model.safetensors"):
            (tmp_path / run / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / run / rel).write_text("same")
    same_run(tmp_path / "dense", tmp_path / "base")
    (tmp_path / "base" / "tokenizer" / "semantic_ids.parquet").write_text("other")
    with pytest.raises(ValueError, match=r"tokenizer differs"):
        same_run(tmp_path / "dense", tmp_path / "base")


def test_the_grid_plot_averages_the_runs(tmp_path, monkeypatch):
    import json

    from benchmarks import dense_head

    monkeypatch.setattr(dense_head, "RESULTS", tmp_path)
    paths = []
    for i, v in enumerate((0.1, 0.3)):
        grid = {f"{a:g},{b:g}": v + a / 100 for a in (0, 1) for b in (0, 2)}
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps({"valid": {"grid_recall@10": grid, "base_grid_recall@10": {"0,0": v, "0,2": v}}}))
        paths.append(path)
    out = dense_head.main(["--plot", *map(str, paths), "--name", "t"])
    assert (tmp_path / "dense_head_grid_t.png").stat().st_size > 0
    # rows: the plain backbone, then a = 0 and a = 1; the mean of 0.1 and 0.3, plus a / 100
    np.testing.assert_allclose(out["table"], [[0.2, 0.2], [0.2, 0.2], [0.21, 0.21]])
    with pytest.raises(SystemExit):
        dense_head.main([])  # ranking needs --base
