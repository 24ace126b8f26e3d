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
