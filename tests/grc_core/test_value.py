import math

import numpy as np
import pytest
import torch

from grc_core.config import ModelConfig, ValueConfig
from grc_core.data import ItemTable, make_instances, to_batch
from grc_core.grc import expand_memory
from grc_core.model import Seq2Seq
from grc_core.trie import PrefixTrie
from grc_core.value import (Prefixes, ValueHead, bucket_embeddings, discounted_returns, prefix_buckets,
                            prefix_hidden, sample_candidates, semantic_step_rewards, td_targets, value_loss)

VCFG = ValueConfig(d_ff=16, n_heads=2, level_weights=(0.3, 0.5, 1.0), gamma=0.99, steps=1, users_per_step=2,
                   samples=4, lr=1e-3)


def test_step_rewards_by_hand():
    # one user, target ID (0, 0, 0) = item 0 with embedding (1, 0); three candidates:
    #   item 0 (0,0,0) e=(1,0): on the target's prefix at every level -> r = w = (0.3, 0.5, 1.0)
    #   item 1 (0,1,0) e=(0,1): level 1 on target (0.3); level 2 bucket {item 1}: cos((0,1),(1,0)) = 0
    #       -> -0.5 (1 - 0) = -0.5; level 3 bucket {item 1} -> -1.0
    #   item 2 (1,0,0) e=(-1,0): level 1 bucket {item 2}: cos = -1 -> -0.3 (1 + 1) = -0.6; levels 2, 3: -1.0, -2.0
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    codes = torch.tensor([[[0, 0, 0], [0, 1, 0], [1, 0, 0]]])
    cand = Prefixes(codes, torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool))
    r = semantic_step_rewards(cand, torch.tensor([[0, 0, 0]]), emb, torch.tensor([0]), torch.tensor([0.3, 0.5, 1.0]))
    want = torch.tensor([[[0.3, 0.5, 1.0], [0.3, -0.5, -1.0], [-0.6, -1.0, -2.0]]])
    assert torch.allclose(r, want, atol=1e-6)


def test_bucket_mean_is_over_the_candidates_sharing_the_prefix():
    # target (2, 0) with embedding (1, 0); candidates items 0 (0,0) e=(0,1) and 1 (0,1) e=(1,1)/sqrt2 share level 1:
    # bucket mean (1/(2 sqrt2), (1 + 1/sqrt2)/2); cos with (1,0) = 0.3536 / |(0.3536, 0.8536)| = 0.3827
    # -> r_1 = -1 (1 - 0.3827) = -0.6173 for both; a padded third candidate is left out and gets 0
    s = 1 / math.sqrt(2)
    emb = torch.tensor([[0.0, 1.0], [s, s], [1.0, 0.0]])
    codes = torch.tensor([[[0, 0], [0, 1], [0, 0]]])
    live = torch.tensor([[True, True, False]])
    same = prefix_buckets(codes, live)
    assert same[0, 0, 1, 0] and not same[0, 0, 1, 1] and not same[0, 0, 2, 0]
    mean = bucket_embeddings(same, emb[torch.tensor([[0, 1, 2]])])
    assert torch.allclose(mean[0, 0, 0], torch.tensor([s / 2, (1 + s) / 2]))
    r = semantic_step_rewards(Prefixes(codes, torch.tensor([[0, 1, 2]]), live), torch.tensor([[2, 0]]), emb,
                              torch.tensor([2]), torch.tensor([1.0, 2.0]))
    assert r[0, 0, 0].item() == pytest.approx(-(1 - 0.38268343), abs=1e-5)
    assert r[0, 1, 0].item() == pytest.approx(r[0, 0, 0].item())
    assert r[0, 2].abs().sum().item() == 0.0


def test_td_targets_and_returns_by_hand():
    r = torch.tensor([[0.3, -0.5, -1.0]])
    v = torch.tensor([[0.1, 0.2, 0.4]])  # V(s_1), V(s_2), V(s_3)
    # y_1 = 0.3 + 0.5 * 0.2 = 0.4; y_2 = -0.5 + 0.5 * 0.4 = -0.3; y_3 = r_3 = -1.0
    assert torch.allclose(td_targets(r, v, 0.5), torch.tensor([[0.4, -0.3, -1.0]]))
    # G_3 = -1; G_2 = -0.5 + 0.5 (-1) = -1; G_1 = 0.3 + 0.5 (-1) = -0.2
    assert torch.allclose(discounted_returns(r, 0.5), torch.tensor([[-0.2, -1.0, -1.0]]))
    # loss over live rows only: ((0.1-0.4)^2 + (0.2+0.3)^2 + (0.4+1)^2) / 3 = (0.09 + 0.25 + 1.96) / 3
    live = torch.tensor([[True, False]])
    vals = torch.stack([v, torch.full_like(v, 9.0)], 1)  # (1, 2, 3): the padded row must not count
    tg = torch.stack([td_targets(r, v, 0.5)] * 2, 1)
    assert value_loss(vals, tg, live).item() == pytest.approx(2.30 / 3)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, d_ff=32, n_heads=2, encoder_layers=1, decoder_layers=2, dropout=0.0, layout="item",
                      max_history=4)
    return Seq2Seq(cfg, [3, 3, 2], [2]).eval()


def tiny_catalog():
    ids = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 2, 0], [2, 0, 0], [2, 1, 1]])
    trie = PrefixTrie.from_ids(ids, [3, 3, 2])
    return ItemTable(torch.from_numpy(ids), torch.zeros(6, 1, dtype=torch.long)), trie


def test_value_head_is_causal_over_prefix_states():
    seq, (table, _) = tiny_model(), tiny_catalog()
    head = ValueHead(16, VCFG)
    inst = make_instances([0, 1], [[1, 2], [3]], [0, 4], 4)
    memory = seq.encode(to_batch(inst, table))
    codes = torch.tensor([[0, 0, 1], [0, 0, 0]])
    h = prefix_hidden(seq, memory, codes)
    assert h.shape == (2, 4, 16)
    v = head(h)
    # changing the last code changes only the last state's value
    v2 = head(prefix_hidden(seq, memory, torch.tensor([[0, 0, 0], [0, 0, 0]])))
    assert torch.allclose(v[0, :3], v2[0, :3], atol=1e-6) and not torch.isclose(v[0, 3], v2[0, 3])


def test_sampled_candidates_are_valid_distinct_and_not_excluded():
    seq, (table, trie) = tiny_model(), tiny_catalog()
    inst = make_instances([0, 1], [[1, 2], [3]], [0, 4], 4)
    exclude = torch.zeros(2, 6, dtype=torch.bool)
    exclude[0, [1, 2]] = True
    exclude[1, 3] = True
    gen = torch.Generator().manual_seed(0)
    c = sample_candidates(seq, to_batch(inst, table), trie, 8, gen, exclude)
    assert c.codes.shape == (2, 8, 3)
    for b in range(2):
        got = c.items[b][c.live[b]].tolist()
        assert len(got) == len(set(got)) and not exclude[b, got].any()
        assert torch.equal(table.codes[c.items[b]], c.codes[b])
    again = sample_candidates(seq, to_batch(inst, table), trie, 8, torch.Generator().manual_seed(0), exclude)
    assert torch.equal(again.items, c.items)
