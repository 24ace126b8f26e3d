"""benchmarks.sasrec_pair: the fused ranks by hand, excluded items, and the validation choice of w."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.sasrec_pair import fused_ranks
from grc_core.metrics import choose_weight


def test_fused_ranks_by_hand():
    # item scores: A prefers 0 > 1 > 2 > 3, B prefers 3 > 2 > 1 > 0
    a = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    b = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert fused_ranks(a, b, np.array([3]), 0.0, 4).tolist() == [4]  # A alone
    # w = 1: the products are 0.04, 0.06, 0.06, 0.04 -> 1, 2 tie first (smaller id first), then 0, 3
    assert fused_ranks(a, b, np.array([2]), 1.0, 4).tolist() == [2]
    assert fused_ranks(a, b, np.array([0]), 1.0, 4).tolist() == [3]
    # w = 4: B dominates, item 3 first; depth 2 leaves item 0 unranked
    assert fused_ranks(a, b, np.array([3]), 4.0, 4).tolist() == [1]
    assert fused_ranks(a, b, np.array([0]), 4.0, 2).tolist() == [0]


def test_excluded_items_are_never_ranked():
    a = torch.tensor([[0.0, -math.inf, -1.0]])
    b = torch.tensor([[-1.0, -math.inf, 0.0]])
    assert fused_ranks(a, b, np.array([1]), 1.0, 3).tolist() == [0]
    assert fused_ranks(a, b, np.array([2]), 2.0, 3).tolist() == [1]


def test_weight_chosen_by_recall_then_ndcg_then_the_smaller():
    # three users; w 1 hits two in the top 10, w 2 also two but higher up, w 4 one
    valid = {1.0: np.array([9, 10, 0]), 2.0: np.array([1, 2, 0]), 4.0: np.array([1, 0, 0])}
    assert choose_weight(valid)["chosen"] == 2.0
    assert choose_weight({1.0: np.array([3, 0]), 0.5: np.array([3, 0])})["chosen"] == 0.5
    with pytest.raises(ValueError):
        choose_weight({})

