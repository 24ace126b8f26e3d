import numpy as np
import pytest
import torch

from grc_core.cf_value import item_prefix_nodes, prefix_values
from grc_core.config import ModelConfig, ValueConfig, VEDConfig
from grc_core.data import ItemTable, make_instances, to_batch
from grc_core.evaluation import history_mask
from grc_core.model import Seq2Seq
from grc_core.trie import PrefixTrie
from grc_core.value import ValueHead
from grc_core.ved import (CFValue, LearnedValue, ValueQuery, WeightedValue, forward_tokens_of_beam, reference_ved,
                          ved_decode)

VCFG = ValueConfig(d_ff=16, n_heads=2, level_weights=(0.3, 0.5, 1.0), gamma=0.99, steps=1, users_per_step=2,
                   samples=4, lr=1e-3)


def setup(seed=0, n_items=24):
    rng = np.random.default_rng(seed)
    ids = set()
    while len(ids) < n_items:
        ids.add((int(rng.integers(4)), int(rng.integers(4)), int(rng.integers(3))))
    ids = np.array(sorted(ids))
    trie = PrefixTrie.from_ids(ids, [4, 4, 3])
    table = ItemTable(torch.from_numpy(ids), torch.zeros(n_items, 1, dtype=torch.long))
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, d_ff=32, n_heads=2, encoder_layers=1, decoder_layers=2, dropout=0.0, layout="item",
                      max_history=5)
    seq = Seq2Seq(cfg, [4, 4, 3], [2]).eval()
    head = ValueHead(16, VCFG).eval()
    for p in head.parameters():  # values spread enough for the gate and the UCB to matter
        p.data.mul_(20)
    hist = [rng.choice(n_items, size=int(rng.integers(1, 5)), replace=False).tolist() for _ in range(5)]
    inst = make_instances(list(range(5)), hist, [0] * 5, 5)
    return seq, head, trie, table, inst


def cfg_of(**kw):
    base = dict(init_beam=3, candidates=12, budget=20, entropy_weight=0.1, ucb_beta=1.0, expand="greedy", max_iters=60)
    return VEDConfig(**{**base, **kw})


@pytest.mark.parametrize("budget", [5, 14, 30])
def test_batched_ved_matches_the_reference(budget):
    seq, head, trie, table, inst = setup()
    batch = to_batch(inst, table, with_target=False)
    exclude = history_mask(inst.history, table.codes.shape[0])
    cfg = cfg_of(budget=budget)
    fast = ved_decode(seq, batch, trie, cfg, LearnedValue(head), exclude)
    ref = reference_ved(seq, batch, trie, cfg, LearnedValue(head), exclude)
    assert torch.equal(fast.cost, ref.cost) and torch.equal(fast.leaves, ref.leaves)
    assert torch.equal(fast.items, ref.items)
    assert torch.equal(fast.from_leaf, ref.from_leaf)
    assert torch.allclose(fast.scores, ref.scores, atol=1e-4)


def test_ved_properties_valid_ids_no_history_budget_deterministic():
    seq, head, trie, table, inst = setup(1)
    batch = to_batch(inst, table, with_target=False)
    exclude = history_mask(inst.history, table.codes.shape[0])
    init_cost = 1 + 3 + 3 + 3  # root + beam of 3 at each of the 3 levels (enough prefixes at every level)
    for budget in (4, 25):
        cfg = cfg_of(budget=budget, expand="sample")
        a = ved_decode(seq, batch, trie, cfg, LearnedValue(head), exclude, torch.Generator().manual_seed(3))
        b = ved_decode(seq, batch, trie, cfg, LearnedValue(head), exclude, torch.Generator().manual_seed(3))
        assert torch.equal(a.items, b.items) and torch.equal(a.cost, b.cost)
        assert (a.cost <= max(budget, init_cost)).all()
        if budget > init_cost:
            assert (a.cost > init_cost).any()  # the UCB rounds ran
        for u in range(len(inst)):
            got = a.items[u][a.items[u] >= 0]
            assert len(set(got.tolist())) == len(got)  # distinct
            assert not exclude[u, got].any()  # never a history item
            assert torch.equal(table.codes[got], a.codes[u][: len(got)])  # valid IDs, codes match the items
            live = a.scores[u][a.items[u] >= 0]
            assert (live[:-1] >= live[1:]).all()  # descending
            # padding only once the tree and its cached rows have nothing left to offer
            if len(got) < cfg.candidates:
                assert (a.items[u][len(got):] == -1).all()


def test_value_sources_share_one_interface():
    seq, head, trie, table, inst = setup(2)
    batch = to_batch(inst, table, with_target=False)
    exclude = history_mask(inst.history, table.codes.shape[0])
    item_logp = torch.log_softmax(torch.randn(len(inst), table.codes.shape[0], generator=torch.Generator().manual_seed(0)), -1)
    cf = CFValue(prefix_values(item_logp, item_prefix_nodes(trie), trie, exclude))
    q = ValueQuery(torch.zeros(len(inst), 1, 4, 16), torch.full((len(inst), 1), 3), torch.full((len(inst), 1), 5))
    want = item_logp[:, 5].masked_fill(exclude[:, 5], float("-inf")).clamp_min(-30.0)
    assert torch.allclose(cf(q)[:, 0], want)  # at depth L: the item's own log-probability
    mixed = WeightedValue([(LearnedValue(head), 1.0), (cf, 0.5)])
    hid = torch.randn(len(inst), 2, 4, 16)
    q2 = ValueQuery(hid, torch.tensor([[1, 2]] * len(inst)), torch.zeros(len(inst), 2, dtype=torch.long))
    assert torch.allclose(mixed(q2), LearnedValue(head)(q2) + 0.5 * cf(q2))
    res = ved_decode(seq, batch, trie, cfg_of(budget=16), cf, exclude)
    ref = reference_ved(seq, batch, trie, cfg_of(budget=16), cf, exclude)
    assert torch.equal(res.items, ref.items) and torch.equal(res.cost, ref.cost)


def test_forward_tokens_of_beam_by_hand():
    _, _, trie, _, _ = setup()
    # BOS, then min(width, prefixes) at levels 1 and 2: 4 first codes exist, and at least 10 two-code prefixes
    assert forward_tokens_of_beam(trie, 3) == 1 + 3 + 3
    assert forward_tokens_of_beam(trie, 1) == 3


def test_a_seed_with_empty_slots_leaves_room_for_the_whole_budget():
    # A seed beam wider than the valid (non-excluded) items leaves empty seed slots: the cost counts
    # live nodes only, so the expansions may go past the seed's slot count without running out of room.
    seq, head, trie, table, inst = setup(4)
    batch = to_batch(inst, table, with_target=False)
    exclude = history_mask(inst.history, table.codes.shape[0])
    cfg = cfg_of(init_beam=20, budget=80, candidates=30)
    res = ved_decode(seq, batch, trie, cfg, LearnedValue(head), exclude)
    assert (res.cost <= 80).all()
    for u in range(len(inst)):
        got = res.items[u][res.items[u] >= 0]
        assert len(set(got.tolist())) == len(got) and not exclude[u, got].any()


def test_entropy_only_priority_grows_the_same_tree_whatever_the_value():
    """value_weight 0 (the paper's entropy-only ablation): G = lambda H, so the tree VED grows does
    not depend on the value source; the value still orders the leaves it returns."""
    seq, head, trie, table, inst = setup(3)
    batch = to_batch(inst, table, with_target=False)
    exclude = history_mask(inst.history, table.codes.shape[0])
    item_logp = torch.log_softmax(torch.randn(len(inst), table.codes.shape[0], generator=torch.Generator().manual_seed(1)), -1)
    cf = CFValue(prefix_values(item_logp, item_prefix_nodes(trie), trie, exclude))

    def grown(cfg, value):
        res = ved_decode(seq, batch, trie, cfg, value, exclude)
        assert torch.equal(res.items, reference_ved(seq, batch, trie, cfg, value, exclude).items)
        return res.cost.tolist(), [set(res.items[u][res.from_leaf[u]].tolist()) for u in range(len(inst))]

    entropy_only = cfg_of(budget=30, candidates=60, value_weight=0.0)  # every leaf returned
    assert grown(entropy_only, LearnedValue(head)) == grown(entropy_only, cf)
    both = cfg_of(budget=30, candidates=60)
    assert grown(both, LearnedValue(head)) != grown(both, cf)  # with V in G the value steers the growth
