"""benchmarks.id_ensemble: the union of two beams, and teacher forcing that scores as the beam does."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.id_ensemble import teacher_forced, union_candidates
from grc_core.beam_search import exhaustive_scores
from grc_core.data import make_instances, to_batch
from grc_core.model import BackboneStepper
from grc_core.evaluation import rank_with_backbone
from grc_core.trie import PrefixTrie
from tests.grc_core.test_model import LEVELS, catalog, tiny


def test_union_keeps_first_appearances_in_order_and_pads():
    a = np.array([[3, 1, -1], [7, 8, 9]])
    b = np.array([[1, 4, 3], [9, 7, 8]])
    assert union_candidates(a, b).tolist() == [[3, 1, 4, -1, -1, -1], [7, 8, 9, -1, -1, -1]]


def test_teacher_forced_scores_are_the_beams_own():
    table = catalog()
    trie = PrefixTrie.from_ids(table.codes.numpy(), LEVELS)
    model = tiny()
    inst = make_instances(range(3), [[0, 4, 7], [11], [2, 3, 5, 6, 8, 9, 10]], [1, 2, 3], max_len=6)
    items, scores = rank_with_backbone(model, inst, table, trie, 8, batch_size=2)
    cand = items.copy()
    cand[:, -2:] = -1  # padding scores -inf
    got = teacher_forced(model, inst, table, cand, batch=2)
    assert np.allclose(got[:, :-2], scores[:, :-2], atol=1e-5)
    assert np.isneginf(got[:, -2:]).all()
    # every item, kept by the beam or not: the exhaustive step-by-step scores
    every = np.arange(table.codes.shape[0])[None].repeat(3, 0)
    exact = exhaustive_scores(BackboneStepper(model), to_batch(inst, table, with_target=False), trie).numpy()
    assert np.allclose(teacher_forced(model, inst, table, every, batch=3), exact, atol=1e-5)
    assert torch.is_grad_enabled()  # the inference mode ends with the call


def test_cache_files_are_one_per_pair_when_several():
    from pathlib import Path
    from benchmarks.id_ensemble import cache_path
    assert cache_path(Path("/c/x.npz"), 0, 1) == Path("/c/x.npz")
    assert cache_path(Path("/c/x.npz"), 1, 3) == Path("/c/x_1.npz")
    assert cache_path(None, 1, 3) is None


def test_one_pair_chooses_b_on_the_fit_half_and_reads_the_check_half():
    """Run B's log pi puts every target first; run A's beam and SASRec put it 12th. Only the
    scorings that give B a weight find it, and the fit half's choice must say b > 0."""
    from benchmarks.id_ensemble import one_pair
    rng = np.random.default_rng(0)
    users, width = 40, 30
    cand = np.stack([rng.permutation(100)[:width] for _ in range(users)])
    targets = cand[:, 11].copy()
    lp_a = -np.arange(width, dtype=float)[None].repeat(users, 0)  # A (and SASRec) rank in list order
    lp_b = np.full((users, width), -50.0)
    lp_b[:, 11] = 0.0  # B: the target far ahead
    cand[:5, -3:] = -1  # padding never ranks
    got = {"beam_a": cand, "beam_b": cand[:, ::-1].copy(), "cand": cand, "lp_a": lp_a, "lp_b": lp_b,
           "sas": lp_a.copy()}
    fit = np.arange(users) < users // 2
    part, per = one_pair(got, targets, fit, cf_weight_a=1.0)
    assert part["chosen"]["tiger_cf_a_plus_b"]["b"] > 0 and part["chosen"]["union_a_b_sasrec"]["b"] > 0
    assert part["chosen"]["union_a_sasrec"]["b"] == 0.0
    assert per["tiger_cf_a_plus_b"]["recall@10"].tolist() == [1.0] * (users // 2)
    assert per["tiger_cf_a"]["recall@10"].sum() == 0 and per["union_a_sasrec"]["recall@10"].sum() == 0
    assert part["candidates"]["target_among"] == 1.0
    assert got["lp_b"][0, -1] == -50.0  # the caller's arrays are left as they were


def test_the_test_reads_score_is_tiger_cfs_plus_b_and_padding_ranks_last():
    from benchmarks.fusion_ceiling import ordered
    from benchmarks.id_ensemble import plus_b_score
    cand = np.array([[5, 7, 9, -1], [2, 3, -1, -1]])
    lp_a = np.array([[-1.0, -2.0, -3.0, -np.inf], [-2.0, -1.0, -np.inf, -np.inf]])
    lp_b = np.array([[-5.0, -0.1, -0.2, -np.inf], [-0.5, -3.0, -np.inf, -np.inf]])
    sas = np.array([[-1.0, -1.0, -1.0, -np.inf], [-1.0, -1.0, -np.inf, -np.inf]])
    got = {"cand": cand, "lp_a": lp_a, "lp_b": lp_b, "sas": sas}
    assert np.allclose(plus_b_score(got, 0.0, 2.0)[:, :2], lp_a[:, :2] + 2.0 * sas[:, :2])  # b 0: tiger_cf's rule
    assert not np.isnan(plus_b_score(got, 0.0, 2.0)).any()
    assert ordered(cand, plus_b_score(got, 0.0, 1.0)).tolist() == [[5, 7, 9, -1], [3, 2, -1, -1]]
    assert ordered(cand, plus_b_score(got, 1.0, 1.0)).tolist() == [[7, 9, 5, -1], [2, 3, -1, -1]]
