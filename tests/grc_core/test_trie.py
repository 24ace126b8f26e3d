import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grc_core.trie import PrefixTrie


def table(trie: PrefixTrie, level: int) -> list[list[int]]:
    return trie.children(level, torch.arange(trie.num_nodes(level))).tolist()


def test_tables_by_hand():
    # Items 0: (0, 1), 1: (1, 0), 2: (1, 1), sizes (2, 2).
    # Level 0: root -> code 0 -> node 0 (prefix (0,)), code 1 -> node 1 (prefix (1,)).
    # Level 1: node 0 has only code 1 -> item 0; node 1 has code 0 -> item 1, code 1 -> item 2.
    trie = PrefixTrie.from_ids(np.array([[0, 1], [1, 0], [1, 1]]), (2, 2))
    assert table(trie, 0) == [[0, 1]]
    assert table(trie, 1) == [[-1, 0], [1, 2]]
    assert trie.children(1, torch.tensor([0])).dtype == torch.int64
    assert trie.layouts == ("dense", "dense")
    assert trie.num_levels == 2 and trie.level_sizes == (2, 2) and trie.num_items == 3
    assert [trie.num_nodes(level) for level in range(3)] == [1, 2, 3]
    assert trie.nbytes == (1 * 2 + 2 * 2) * 8  # 48


def test_children_are_numbered_by_parent_then_code():
    # Rows out of order: prefixes (2,), (0,), (1,) -> nodes 2, 0, 1 at level 1.
    trie = PrefixTrie.from_ids(np.array([[2, 0], [0, 1], [1, 1], [0, 0]]), (3, 2))
    assert table(trie, 0) == [[0, 1, 2]]
    assert table(trie, 1) == [[3, 1], [-1, 2], [0, -1]]


@pytest.mark.parametrize("dense_max_bytes", [2**20, 0])
def test_mask_and_step_are_batched_lookups(dense_max_bytes):
    trie = PrefixTrie.from_ids(np.array([[0, 1], [1, 0], [1, 1]]), (2, 2), dense_max_bytes=dense_max_bytes)
    nodes = torch.tensor([[0, 1], [1, 1]])  # (B=2, W=2) nodes at level 1
    assert trie.valid_mask(1, nodes).tolist() == [[[False, True], [True, True]], [[True, True], [True, True]]]
    assert trie.next_nodes(1, nodes, torch.tensor([[1, 0], [1, 1]])).tolist() == [[0, 1], [2, 2]]
    assert trie.next_nodes(1, torch.tensor([0]), torch.tensor([0])).tolist() == [-1]
    assert trie.valid_mask(0, torch.zeros(3, dtype=torch.long)).shape == (3, 2)


@pytest.mark.parametrize("dense_max_bytes", [2**20, 0])
def test_to_keeps_tables(dense_max_bytes):
    trie = PrefixTrie.from_ids(np.array([[0, 1], [1, 0]]), (2, 2), dense_max_bytes=dense_max_bytes).to("cpu")
    assert table(trie, 1) == [[-1, 0], [1, -1]]
    assert trie.ids.tolist() == [[0, 1], [1, 0]]


@pytest.mark.parametrize(
    "ids, sizes, message",
    [
        (np.array([[0, 1], [1, 0], [0, 1]]), (2, 2), "items 0 and 2 share the ID \\[0, 1\\]"),
        (np.array([[0, 2]]), (2, 2), "item 0 has code 2 at level 1"),
        (np.array([[0, -1]]), (2, 2), "item 0 has code -1"),
        (np.array([[0, 1]]), (2,), "one size >= 1 for each of the L=2 levels"),
        (np.zeros((0, 2), dtype=np.int64), (2, 2), "non-empty"),
        (np.array([[0.0, 1.0]]), (2, 2), "integers"),
    ],
)
def test_bad_ids_raise(ids, sizes, message):
    with pytest.raises(ValueError, match=message):
        PrefixTrie.from_ids(ids, sizes)


@st.composite
def catalogs(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    space = int(np.prod(sizes))
    keys = draw(st.lists(st.integers(0, space - 1), min_size=1, max_size=min(space, 40), unique=True))
    ids = np.array(np.unravel_index(keys, sizes)).T.reshape(len(keys), len(sizes))  # (N, L) mixed radix
    return ids.astype(np.int64), sizes


@settings(max_examples=60, deadline=None)
@given(catalogs())
def test_phi_of_id_is_identity(catalog):
    ids, sizes = catalog
    trie = PrefixTrie.from_ids(ids, sizes)
    nodes = torch.zeros(len(ids), dtype=torch.long)  # (N,) walk every item's ID from the root
    for level in range(len(sizes)):
        assert trie.valid_mask(level, nodes)[torch.arange(len(ids)), torch.from_numpy(ids[:, level])].all()
        nodes = trie.next_nodes(level, nodes, torch.from_numpy(ids[:, level]))
        assert trie.num_nodes(level + 1) == len(np.unique(ids[:, : level + 1], axis=0))
    assert nodes.tolist() == list(range(len(ids)))
    # The valid full paths are exactly the items: one leaf entry per item.
    leaves = torch.tensor(table(trie, len(sizes) - 1))
    assert sorted(leaves[leaves >= 0].tolist()) == list(range(len(ids)))
    assert trie.nbytes == 8 * sum(trie.num_nodes(level) * size for level, size in enumerate(sizes))


@settings(max_examples=60, deadline=None)
@given(catalogs(), st.integers(0, 2**31 - 1))
def test_csr_levels_answer_as_dense_ones(catalog, seed):
    ids, sizes = catalog
    dense = PrefixTrie.from_ids(ids, sizes)
    csr = PrefixTrie.from_ids(ids, sizes, dense_max_bytes=0)
    assert set(csr.layouts) == {"csr"} and set(dense.layouts) == {"dense"}
    # 16 bytes per edge; a level has one edge per node of the next level (per item at the last).
    assert csr.nbytes == 16 * sum(csr.num_nodes(level) for level in range(1, len(sizes) + 1))
    gen = torch.Generator().manual_seed(seed)
    for level, size in enumerate(sizes):
        nodes = torch.randint(csr.num_nodes(level), (3, 5), generator=gen)  # (3, 5) with repeats
        codes = torch.randint(size, (3, 5), generator=gen)
        assert torch.equal(csr.children(level, nodes), dense.children(level, nodes))
        assert torch.equal(csr.next_nodes(level, nodes, codes), dense.next_nodes(level, nodes, codes))
        assert torch.equal(csr.children(level, nodes[0, 0]), dense.children(level, nodes[0, 0]))  # 0-d nodes


def test_layout_is_chosen_per_level_by_size():
    ids = np.array([[a, b] for a in range(4) for b in range(8)])  # level 0: 1 x 4 cells, level 1: 4 x 8
    trie = PrefixTrie.from_ids(ids, (4, 8), dense_max_bytes=8 * 4)
    assert trie.layouts == ("dense", "csr")
    assert trie.level_nbytes(0) == 8 * 4 and trie.level_nbytes(1) == 16 * 32
