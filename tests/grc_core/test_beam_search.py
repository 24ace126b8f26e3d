import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grc_core.beam_search import BeamResult, beam_search, exhaustive_scores, exhaustive_topk, reference_beam_search
from grc_core.trie import PrefixTrie

NEG_INF = float("-inf")


class TableStub:
    """Fixed logits per (user, prefix): level l's log-probs come from a seeded table row picked by the
    user and the prefix's mixed-radix key. The state is the prefix itself, gathered by `parents`, so
    a wrong parent shows up as wrong scores. The batch is a LongTensor of user ids (B,)."""

    def __init__(self, sizes, users=4, seed=0, scale=1.0):
        gen = torch.Generator().manual_seed(seed)
        self.sizes = list(sizes)
        self.tables = [
            torch.log_softmax(scale * torch.randn(users, int(np.prod(self.sizes[:level])), size, generator=gen), -1)
            for level, size in enumerate(self.sizes)
        ]  # level l: (U, prod V_<l, V_l)

    def _logp(self, users, prefixes):
        level = prefixes.shape[-1]
        key = torch.zeros(prefixes.shape[:-1], dtype=torch.long)  # (B, W)
        for j in range(level):
            key = key * self.sizes[j] + prefixes[..., j]
        return self.tables[level][users[:, None], key]  # (B, W, V_level)

    def begin(self, batch):
        prefixes = torch.zeros(len(batch), 1, 0, dtype=torch.long)  # (B, 1, 0)
        return self._logp(batch, prefixes), (batch, prefixes)

    def advance(self, state, parents, tokens, level):
        users, prefixes = state
        assert prefixes.shape[-1] == level
        kept = prefixes.gather(1, parents[..., None].expand(-1, -1, level))  # (B, W, level)
        prefixes = torch.cat([kept, tokens[..., None]], dim=2)  # (B, W, level+1)
        return self._logp(users, prefixes), (users, prefixes)


class GRUStub:
    """A tiny seeded GRU decoder: the state is a hidden vector per beam (B, W, H)."""

    def __init__(self, sizes, users=4, seed=0, hidden=8):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.user = torch.nn.Embedding(users, hidden)
            self.cell = torch.nn.GRUCell(hidden, hidden)
            self.embed = torch.nn.ModuleList(torch.nn.Embedding(v, hidden) for v in sizes)
            self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, v) for v in sizes)

    def _logp(self, h, level):
        return torch.log_softmax(3 * self.heads[level](h), -1)  # (B, W, V_level); x3: peakier

    def begin(self, batch):
        h = self.user(batch)[:, None]  # (B, 1, H)
        return self._logp(h, 0), h

    def advance(self, state, parents, tokens, level):
        h = state.gather(1, parents[..., None].expand(-1, -1, state.shape[-1]))  # (B, W, H)
        b, w, d = h.shape
        h = self.cell(self.embed[level](tokens).view(b * w, d), h.reshape(b * w, d)).view(b, w, d)
        return self._logp(h, level + 1), h


class DictStub:
    """Hand-written probabilities per prefix (the same for every user)."""

    def __init__(self, probs):
        self.probs = probs

    def _logp(self, prefixes):
        rows = [[torch.tensor(self.probs[tuple(p)]).log() for p in beams.tolist()] for beams in prefixes]
        return torch.stack([torch.stack(r) for r in rows])  # (B, W, V)

    def begin(self, batch):
        prefixes = torch.zeros(len(batch), 1, 0, dtype=torch.long)
        return self._logp(prefixes), prefixes

    def advance(self, state, parents, tokens, level):
        prefixes = torch.cat([state.gather(1, parents[..., None].expand(-1, -1, level)), tokens[..., None]], 2)
        return self._logp(prefixes), prefixes


class UniformStub(TableStub):
    def _logp(self, users, prefixes):
        v = self.sizes[prefixes.shape[-1]]
        return torch.full((*prefixes.shape[:-1], v), -math.log(v))


def tiny_catalog(n=30, sizes=(4, 4, 3), seed=0):
    keys = np.random.default_rng(seed).choice(int(np.prod(sizes)), size=n, replace=False)
    return np.array(np.unravel_index(keys, sizes)).T.astype(np.int64)  # (N, L) unique, in random order


USERS = torch.arange(4)


def assert_same(a: BeamResult, b: BeamResult, atol=1e-6):
    assert torch.equal(a.items, b.items)
    assert torch.equal(a.codes, b.codes)
    assert torch.allclose(a.scores, b.scores, atol=atol, rtol=0)
    assert torch.equal(a.scores.isinf(), b.scores.isinf())


def test_hand_worked_example():
    # Items 0: (0, 1), 1: (1, 0), 2: (1, 1). P(code 0) = .6, P(1) = .4; after 0: (.3, .7); after 1: (.5, .5).
    # Item scores: 0 -> .6 * .7 = .42; 1 -> .4 * .5 = .2; 2 -> .4 * .5 = .2 (a tie: code 0 first).
    # (0, 0) has .18 but is no item. Width 1 keeps prefix (0,) and must end at item 0.
    trie = PrefixTrie.from_ids(np.array([[0, 1], [1, 0], [1, 1]]), (2, 2))
    stub = DictStub({(): [0.6, 0.4], (0,): [0.3, 0.7], (1,): [0.5, 0.5]})
    users = torch.arange(1)
    for width, items in [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (5, [0, 1, 2, -1, -1])]:
        for search in (beam_search, reference_beam_search):
            out = search(stub, users, trie, width)
            assert out.items.tolist() == [items]
            expected = [math.log(p) for p in (0.42, 0.2, 0.2)][:width] + [NEG_INF] * (width - 3)
            assert out.scores[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert beam_search(stub, users, trie, 3).codes.tolist() == [[[0, 1], [1, 0], [1, 1]]]


@pytest.mark.parametrize("width", [1, 5, 8, 30, 40])
def test_shapes_sorted_and_valid(width):
    ids = tiny_catalog()
    trie = PrefixTrie.from_ids(ids, (4, 4, 3))
    out = beam_search(TableStub((4, 4, 3)), USERS, trie, width)
    assert out.items.shape == (4, width) and out.scores.shape == (4, width) and out.codes.shape == (4, width, 3)
    assert out.items.dtype == torch.int64 and out.codes.dtype == torch.int64
    assert (out.scores[:, 1:] <= out.scores[:, :-1]).all()
    real = out.items >= 0
    assert real.sum(1).tolist() == [min(width, 30)] * 4  # every valid item has a finite score
    assert out.items[real].lt(30).all()
    assert torch.equal(out.codes[real], trie.ids[out.items[real]])  # phi(codes) == items
    assert len(set(out.items[0, real[0]].tolist())) == real[0].sum()  # no item twice


@pytest.mark.parametrize("stub", [TableStub((4, 4, 3)), GRUStub((4, 4, 3)), TableStub((4, 4, 3), scale=0.05)])
@pytest.mark.parametrize("width", [1, 3, 7, 16, 30])
def test_matches_reference(stub, width):
    trie = PrefixTrie.from_ids(tiny_catalog(), (4, 4, 3))
    assert_same(beam_search(stub, USERS, trie, width), reference_beam_search(stub, USERS, trie, width))


@pytest.mark.parametrize("stub", [TableStub((4, 4, 3), seed=1), GRUStub((4, 4, 3), seed=1)])
def test_full_width_ranks_the_whole_catalog_exactly(stub):
    # With width >= N no prefix is ever pruned, so the beam is the exhaustive ranking. The stub's
    # state is gathered by `parents`; a wrong parent would give a wrong prefix, hence wrong scores.
    trie = PrefixTrie.from_ids(tiny_catalog(seed=1), (4, 4, 3))
    for width in (30, 40):
        assert_same(beam_search(stub, USERS, trie, width), exhaustive_topk(stub, USERS, trie, width))


def test_exhaustive_scores_are_sums_of_table_entries():
    ids = tiny_catalog()
    stub = TableStub((4, 4, 3))
    scores = exhaustive_scores(stub, USERS, PrefixTrie.from_ids(ids, (4, 4, 3)))  # (4, 30)
    u, n = 2, 7
    c = ids[n]
    expected = stub.tables[0][u, 0, c[0]] + stub.tables[1][u, c[0], c[1]] + stub.tables[2][u, c[0] * 4 + c[1], c[2]]
    assert scores[u, n].item() == pytest.approx(expected.item(), abs=1e-6)


def test_pads_when_width_exceeds_valid_items():
    trie = PrefixTrie.from_ids(tiny_catalog(n=5), (4, 4, 3))
    out = beam_search(TableStub((4, 4, 3)), USERS, trie, 9)
    assert (out.items[:, 5:] == -1).all() and (out.codes[:, 5:] == -1).all()
    assert out.scores[:, 5:].eq(NEG_INF).all() and out.scores[:, :5].isfinite().all()
    assert sorted(out.items[0, :5].tolist()) == list(range(5))


def test_minus_inf_log_prob_is_never_returned():
    # Item 1's last code gets log-prob -inf from the model: it counts as absent, like an invalid code.
    # Scores: item 0 -> .6 * .7 = .42, item 2 -> .4 * 1 = .4, item 1 -> .4 * 0.
    trie = PrefixTrie.from_ids(np.array([[0, 1], [1, 0], [1, 1]]), (2, 2))
    stub = DictStub({(): [0.6, 0.4], (0,): [0.3, 0.7], (1,): [0.0, 1.0]})
    for search in (beam_search, reference_beam_search):
        out = search(stub, torch.arange(2), trie, 3)
        assert out.items.tolist() == [[0, 2, -1]] * 2


def test_ties_follow_parent_beam_then_code():
    # All scores equal: beams stay in (parent, code) order, so items come in lexicographic ID order.
    ids = tiny_catalog()
    trie = PrefixTrie.from_ids(ids, (4, 4, 3))
    lexicographic = np.lexsort(ids.T[::-1]).tolist()
    for width in (1, 4, 11, 30):
        for search in (beam_search, reference_beam_search):
            out = search(UniformStub((4, 4, 3)), USERS, trie, width)
            assert out.items.tolist() == [lexicographic[:width]] * 4
    assert exhaustive_topk(UniformStub((4, 4, 3)), USERS, trie, 5).items.tolist() == [[0, 1, 2, 3, 4]] * 4


def test_seed_determinism():
    trie = PrefixTrie.from_ids(tiny_catalog(), (4, 4, 3))
    a = beam_search(GRUStub((4, 4, 3), seed=3), USERS, trie, 6)
    b = beam_search(GRUStub((4, 4, 3), seed=3), USERS, trie, 6)
    c = beam_search(GRUStub((4, 4, 3), seed=4), USERS, trie, 6)
    assert_same(a, b, atol=0)
    assert not torch.equal(a.items, c.items)


def test_wide_beam_on_a_larger_catalog():
    # 32 x 16 = 512 possible level-2 prefixes > 256 beams, so the beam prunes.
    sizes = (32, 16, 4)
    trie = PrefixTrie.from_ids(tiny_catalog(n=1500, sizes=sizes, seed=2), sizes)
    stub, users = TableStub(sizes, users=2, seed=2), torch.arange(2)
    out = beam_search(stub, users, trie, 256)
    assert_same(out, reference_beam_search(stub, users, trie, 256))
    assert (out.items >= 0).all()
    exact = exhaustive_topk(stub, users, trie, 256)
    assert torch.equal(out.items[:, :10], exact.items[:, :10])  # the head of the ranking survives pruning here


def test_csr_trie_gives_the_dense_trie_results():
    # Same catalog as above, every level stored as csr: identical items, scores and codes,
    # with and without an exclusion mask at the last level.
    sizes = (32, 16, 4)
    ids = tiny_catalog(n=1500, sizes=sizes, seed=2)
    dense, csr = PrefixTrie.from_ids(ids, sizes), PrefixTrie.from_ids(ids, sizes, dense_max_bytes=0)
    stub, users = TableStub(sizes, users=2, seed=2), torch.arange(2)
    exclude = torch.zeros(2, len(ids), dtype=torch.bool)
    exclude[0, ::3] = True
    for width in (1, 20, 256):
        for mask in (None, exclude):
            a, b = beam_search(stub, users, dense, width, exclude=mask), beam_search(stub, users, csr, width, exclude=mask)
            assert torch.equal(a.items, b.items) and torch.equal(a.scores, b.scores) and torch.equal(a.codes, b.codes)
    assert_same(reference_beam_search(stub, users, csr, 20), beam_search(stub, users, dense, 20))


def test_guards():
    trie = PrefixTrie.from_ids(tiny_catalog(), (4, 4, 3))
    with pytest.raises(ValueError, match="width must be a positive int"):
        beam_search(TableStub((4, 4, 3)), USERS, trie, 0)
    with pytest.raises(ValueError, match=r"begin: .* shape \(4, 1, 4\), expected \(B, 1, 5\)"):
        beam_search(TableStub((4, 4, 3)), USERS, PrefixTrie.from_ids(tiny_catalog(sizes=(5, 4, 3)), (5, 4, 3)), 3)


@st.composite
def search_cases(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    space = int(np.prod(sizes))
    keys = draw(st.lists(st.integers(0, space - 1), min_size=1, max_size=min(space, 24), unique=True))
    ids = np.array(np.unravel_index(keys, sizes)).T.reshape(len(keys), len(sizes)).astype(np.int64)
    width = draw(st.integers(1, len(keys) + 3))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.0, 0.01, 1.0]))  # 0: all tied
    return ids, sizes, width, seed, scale


@settings(max_examples=60, deadline=None)
@given(search_cases())
def test_property_fast_equals_reference_and_full_width_is_exact(case):
    ids, sizes, width, seed, scale = case
    trie = PrefixTrie.from_ids(ids, sizes)
    stub = TableStub(sizes, users=3, seed=seed, scale=scale)
    users = torch.arange(3)
    out = beam_search(stub, users, trie, width)
    assert_same(out, reference_beam_search(stub, users, trie, width))
    assert (out.scores[:, 1:] <= out.scores[:, :-1]).all()
    real = out.items >= 0
    assert real.sum(1).tolist() == [min(width, len(ids))] * 3
    assert torch.equal(out.codes[real], trie.ids[out.items[real]])
    if width >= len(ids) and scale > 0:
        exact = exhaustive_topk(stub, users, trie, width)
        assert_same(out, exact)


def test_excluded_items_never_come_back_and_the_beam_refills():
    from grc_core.evaluation import history_mask
    from grc_core.model import BackboneStepper
    from tests.grc_core.test_model import LEVELS, batch_for, catalog, tiny

    model, table = tiny(), catalog()
    trie = PrefixTrie.from_ids(table.codes.numpy(), LEVELS)
    batch = batch_for(table, [[0, 1, 2], [3]], [4, 5])._replace(target_codes=None)
    stepper = BackboneStepper(model)
    plain = beam_search(stepper, batch, trie, 10)
    banned_items = plain.items[:, :3]  # (2, 3) each user's three best items
    exclude = torch.zeros(2, table.codes.shape[0], dtype=torch.bool)
    exclude.scatter_(1, banned_items, True)
    res = beam_search(stepper, batch, trie, 10, exclude=exclude)
    for u in range(2):
        got = res.items[u].tolist()
        assert not set(got) & set(banned_items[u].tolist())
        assert len(set(got)) == 10 and min(got) >= 0
        assert got[:7] == plain.items[u, 3:].tolist()  # the rest keeps its order, then new items fill in
    hist = torch.tensor([[-1, 2, 7], [3, -1, -1]])
    mask = history_mask(hist, 9)
    assert mask.tolist() == [[i in (2, 7) for i in range(9)], [i == 3 for i in range(9)]]
