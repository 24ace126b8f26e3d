import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from grc_core.semantic_ids import (
    collision_rate,
    disambiguate,
    item_for_ids,
    lookup_table,
    parse_prebuilt_codes,
    prefix_edges,
    reassign_last_level,
    semantic_coherence,
    tokenizer_inputs,
)


def small_codes(max_levels: int = 3, max_code: int = 3):
    shapes = st.tuples(st.integers(1, 30), st.integers(1, max_levels))
    return shapes.flatmap(lambda s: arrays(np.int64, s, elements=st.integers(0, max_code)))


def test_collision_rate_by_hand():
    # (0,0) is held by items 0 and 1; (0,1) and (1,0) are unique -> 2 of 4 items collide.
    codes = np.array([[0, 0], [0, 0], [0, 1], [1, 0]])
    assert collision_rate(codes) == 0.5
    assert collision_rate(torch.tensor([[1, 2], [2, 1]])) == 0.0


def test_disambiguate_by_hand():
    codes = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    ids, size = disambiguate(codes)
    # (1,2) is shared by items 0, 2, 3 -> ranks 0, 1, 2 by item index; the rest get 0.
    np.testing.assert_array_equal(ids, [[1, 2, 0], [0, 0, 0], [1, 2, 1], [1, 2, 2], [0, 1, 0]])
    assert size == 3
    assert ids.dtype == np.int64


def test_disambiguate_without_collisions_adds_no_level():
    codes = np.array([[0, 1], [1, 0], [1, 1]])
    ids, size = disambiguate(codes)
    np.testing.assert_array_equal(ids, codes)
    assert size == 0


@settings(max_examples=150, deadline=None)
@given(small_codes())
def test_disambiguated_ids_are_unique_and_phi_inverts_them(codes):
    ids, size = disambiguate(codes)
    n = len(codes)
    assert len(np.unique(ids, axis=0)) == n
    np.testing.assert_array_equal(ids[:, : codes.shape[1]], codes)
    if size:
        assert ids.shape[1] == codes.shape[1] + 1 and ids[:, -1].max() == size - 1
    table = lookup_table(ids)
    np.testing.assert_array_equal(item_for_ids(table, ids), np.arange(n))
    # The trie: every leaf is one item, and each parent's children are sorted by code.
    trie = prefix_edges(ids)
    leaves = trie.level == ids.shape[1]
    assert sorted(trie.item[leaves].tolist()) == list(range(n))
    np.testing.assert_array_equal(trie.node, np.arange(1, len(trie.node) + 1))
    for parent in np.unique(trie.parent):
        kids = trie.code[trie.parent == parent]
        assert (np.diff(kids) > 0).all()


def test_item_for_ids_returns_minus_one_for_unknown_ids():
    ids = np.array([[0, 1], [0, 0], [1, 0]])
    table = lookup_table(ids)
    query = np.array([[1, 0], [0, 1], [1, 1], [2, 0], [-1, 0], [0, 0]])
    # (1,1) is inside the ID space but no item; (2,0) and (-1,0) are outside it.
    np.testing.assert_array_equal(item_for_ids(table, query), [2, 0, -1, -1, -1, 1])


def test_lookup_table_refuses_duplicate_ids():
    with pytest.raises(ValueError, match="items 0 and 2 share the ID"):
        lookup_table(np.array([[1, 1], [0, 1], [1, 1]]))


def test_prefix_edges_by_hand():
    ids = np.array([[0, 1], [0, 0], [1, 0]])
    trie = prefix_edges(ids)
    # Level 1: root->code 0 is node 1, root->code 1 is node 2.
    # Level 2 under node 1: code 0 (item 1) is node 3, code 1 (item 0) node 4; under node 2: code 0 (item 2) node 5.
    np.testing.assert_array_equal(trie.level, [1, 1, 2, 2, 2])
    np.testing.assert_array_equal(trie.node, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(trie.parent, [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(trie.code, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(trie.item, [-1, -1, 1, 0, 2])


def test_reassign_last_level_by_hand():
    codes = np.array([[0, 1], [0, 1], [0, 1], [0, 2], [1, 1], [1, 1]])
    d = np.array(
        [
            [0.5, 0.3, 0.9, 0.8],
            [0.4, 0.2, 0.9, 0.1],
            [0.6, 0.7, 0.9, 0.2],
            [0.9, 0.9, 0.1, 0.9],
            [0.6, 0.5, 0.7, 0.9],
            [0.6, 0.5, 0.55, 0.7],
        ]
    )
    out = reassign_last_level(codes, d)
    # Prefix 0: items 0,1,2 share code 1; item 1 is nearest to it (0.2) and stays. Free codes {0,3}.
    #   Pairs: (item 2, code 3) 0.2 < (item 0, code 0) 0.5 < ... -> item 2 -> 3, then item 0 -> 0.
    # Prefix 1: items 4,5 tie on code 1 (0.5); item 4 (lower index) stays; item 5's nearest free
    #   code among {0, 2, 3} is 2 (0.55).
    np.testing.assert_array_equal(out, [[0, 0], [0, 1], [0, 3], [0, 2], [1, 1], [1, 2]])
    np.testing.assert_array_equal(codes[:, 1], [1, 1, 1, 2, 1, 1])  # input untouched


def test_reassign_last_level_leaves_the_excess_of_a_full_group_colliding():
    # L=1, K=2: one prefix group of 3 items. Item 0 stays on code 0 (0.1); the only free code 1
    # goes to item 1 (0.3 < 0.4); item 2 keeps colliding with item 0.
    codes = np.array([[0], [0], [0]])
    d = np.array([[0.1, 0.5], [0.2, 0.3], [0.3, 0.4]])
    out = reassign_last_level(codes, d)
    np.testing.assert_array_equal(out, [[0], [1], [0]])
    assert collision_rate(out) == pytest.approx(2 / 3)


@settings(max_examples=100, deadline=None)
@given(small_codes(max_code=3), st.integers(0, 2**31 - 1))
def test_reassign_last_level_properties(codes, seed):
    k = 4
    d = np.random.default_rng(seed).random((len(codes), k))
    out = reassign_last_level(codes, d)
    np.testing.assert_array_equal(out[:, :-1], codes[:, :-1])
    assert collision_rate(out) <= collision_rate(codes)
    # Unique items never move.
    _, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    unique_items = counts[inv.reshape(-1)] == 1
    np.testing.assert_array_equal(out[unique_items], codes[unique_items])
    # A prefix group of at most K items ends up collision-free.
    _, pinv, pcounts = np.unique(codes[:, :-1], axis=0, return_inverse=True, return_counts=True)
    small = pcounts[pinv.reshape(-1)] <= k
    assert len(np.unique(out[small], axis=0)) == small.sum()


def test_reassign_last_level_checks_shapes():
    with pytest.raises(ValueError, match=r"distances must be \(N=2, K\)"):
        reassign_last_level(np.array([[0], [0]]), np.zeros((3, 4)))


def test_parse_prebuilt_codes():
    codes = parse_prebuilt_codes([["<a_12>", "<b_7>", "<c_201>", "<d_33>"], ["<a_0>", "<b_255>", "<c_1>", "<d_0>"]])
    np.testing.assert_array_equal(codes, [[12, 7, 201, 33], [0, 255, 1, 0]])
    assert codes.dtype == np.int64


@pytest.mark.parametrize(
    "tokens, message",
    [
        ([["<a_1>", "<b_2>"], ["<a_1>", "<c_2>"]], r"row 1, token 1 '<c_2>' is level 'c', expected 'b'"),
        ([["<a_1>", "<b-2>"]], r"row 0, token 1 '<b-2>' is not of the form"),
        ([["<a_1>", "b_2"]], r"row 0, token 1 'b_2' is not of the form"),
        ([["<a_1>", "<b_2>"], ["<a_1>"]], r"row 1 has 1 tokens, row 0 has 2"),
        ([], r"no rows"),
    ],
)
def test_parse_prebuilt_codes_errors(tokens, message):
    with pytest.raises(ValueError, match=message):
        parse_prebuilt_codes(tokens)


def test_semantic_coherence_by_hand():
    codes = np.array([5, 5, 7, 3, 3, 3, 9])
    buckets = np.array([1, 1, 1, 2, 2, 0, 2])
    # Category 1: codes 5,5,7 -> mode 5 -> 2 items agree; category 2: items 3,4,6 have codes
    # 3,3,9 -> mode 3 -> 2 agree; item 5 has no category. 4 / 6.
    assert semantic_coherence(codes, buckets) == pytest.approx(4 / 6)


def test_semantic_coherence_tie_and_unknown():
    # Category 4 has codes 4 and 2 once each; the tie goes to code 2 -> 1 of 2 items agree.
    assert semantic_coherence(np.array([4, 2]), np.array([4, 4])) == 0.5
    assert math.isnan(semantic_coherence(np.array([1, 2]), np.array([0, 0])))
    with pytest.raises(ValueError, match=r"must be \(N,\)"):
        semantic_coherence(np.array([1, 2]), np.array([1]))


def test_tokenizer_inputs_text_cf_blocks_are_unit_and_weighted():
    text = np.array([[3.0, 4.0], [0.0, 2.0]])  # unit rows: (0.6, 0.8), (0, 1)
    cf = np.array([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])  # unit rows: (0, 0, 1), (1, 0, 0)
    out = tokenizer_inputs("text_cf", text, cf, cf_share=0.36)
    # sqrt(1 - 0.36) = 0.8 on the text block, sqrt(0.36) = 0.6 on the cf block
    expected = np.array([[0.48, 0.64, 0.0, 0.0, 0.6], [0.0, 0.8, 0.6, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert out.dtype == np.float32


def test_tokenizer_inputs_cf_alone_and_text_alone():
    cf = np.array([[0.0, 2.0], [3.0, 0.0]])
    np.testing.assert_allclose(tokenizer_inputs("cf", None, cf, 0.5), [[0.0, 1.0], [1.0, 0.0]])
    text = np.array([[0.6, 0.8]], np.float32)
    assert np.array_equal(tokenizer_inputs("text", text, None, 0.5), text)  # unchanged: the default IDs stay as they were


@pytest.mark.parametrize("kind, text, cf, share, match", [
    ("cf", np.ones((2, 2)), None, 0.5, "cf embeddings are missing"),
    ("text_cf", np.ones((2, 2)), np.ones((3, 2)), 0.5, "2 text rows for 3 cf rows"),
    ("text_cf", np.ones((2, 2)), np.ones((2, 2)), 1.0, "cf_share must be in"),
    ("both", np.ones((2, 2)), np.ones((2, 2)), 0.5, "tokenize.embedding must be"),
])
def test_tokenizer_inputs_errors(kind, text, cf, share, match):
    with pytest.raises(ValueError, match=match):
        tokenizer_inputs(kind, text, cf, share)
