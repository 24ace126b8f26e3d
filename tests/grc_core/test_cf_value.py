import math

import numpy as np
import pytest
import torch

from grc_core.beam_search import beam_search, exhaustive_scores
from grc_core.cf_value import item_prefix_nodes, level_soft_targets, prefix_values, segment_logsumexp
from grc_core.model import sequence_loss
from grc_core.trie import PrefixTrie
from tests.grc_core.test_beam_search import TableStub

NEG_INF = float("-inf")


def test_segment_logsumexp_by_hand():
    # segment 0 holds e^0 + e^ln2 = 3; segment 1 only -inf (no mass); segment 2 holds 3; segment 3 is empty
    values = torch.tensor([[0.0, math.log(2), NEG_INF, math.log(3)]])
    out = segment_logsumexp(values, torch.tensor([0, 0, 1, 2]), 4)
    assert out[0, 0].item() == pytest.approx(math.log(3)) and out[0, 2].item() == pytest.approx(math.log(3))
    assert out[0, 1].item() == NEG_INF and out[0, 3].item() == NEG_INF
    # large values do not overflow: log(e^1000 + e^1000) = 1000 + ln 2
    big = segment_logsumexp(torch.tensor([[1000.0, 1000.0]]), torch.tensor([0, 0]), 1)
    assert big[0, 0].item() == pytest.approx(1000 + math.log(2))


def tiny_trie():
    # items 0..4 with IDs (0,0) (0,1) (1,0) (2,0) (2,1): three first-level prefixes
    return PrefixTrie.from_ids(np.array([[0, 0], [0, 1], [1, 0], [2, 0], [2, 1]]), [3, 2])


def test_prefix_values_are_the_mass_under_each_prefix():
    trie = tiny_trie()
    nodes = item_prefix_nodes(trie)
    assert len(nodes) == 1 and nodes[0][0] == nodes[0][1] and len(set(nodes[0].tolist())) == 3
    p = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]])
    values = prefix_values(p.log(), nodes, trie)
    first = {code: values[0][0, trie.next_nodes(0, torch.tensor(0), torch.tensor(code))].exp().item()
             for code in range(3)}
    assert first == pytest.approx({0: 0.3, 1: 0.3, 2: 0.4})  # 0.1 + 0.2, 0.3, 0.15 + 0.25
    assert torch.equal(values[1], p.log())  # the last level is the items' own log-probabilities
    # excluded items carry no mass: without item 3, prefix 2 holds 0.25 and item 3 is -inf
    masked = prefix_values(p.log(), nodes, trie, exclude=torch.tensor([[False, False, False, True, False]]))
    assert masked[0][0, trie.next_nodes(0, torch.tensor(0), torch.tensor(2))].exp().item() == pytest.approx(0.25)
    assert masked[1][0, 3].item() == NEG_INF


def test_a_wide_fused_search_is_the_exhaustive_fused_ranking():
    # With a beam as wide as the catalog nothing is pruned: the result must be every item ordered
    # by log pi(item) + w * log p_cf(item), the score it reports.
    trie, model = tiny_trie(), TableStub([3, 2], users=2, seed=3)
    users = torch.arange(2)
    cf = torch.log_softmax(torch.randn(2, 5, generator=torch.Generator().manual_seed(1)), -1)
    values = prefix_values(cf, item_prefix_nodes(trie), trie)
    res = beam_search(model, users, trie, 5, values=values, value_weight=0.7)
    fused = exhaustive_scores(model, users, trie) + 0.7 * cf  # (2, 5)
    expected = torch.sort(fused, dim=1, descending=True)
    assert torch.equal(res.items, expected.indices)
    assert torch.allclose(res.scores, expected.values, atol=1e-6)


def test_the_value_keeps_a_prefix_the_model_alone_prunes():
    # The model prefers first code 0 (p 0.84 against 0.13 for code 1); a beam of 1 then never reaches item 2. A value that
    # puts all the collaborative mass on item 2 keeps prefix 1 and returns item 2.
    trie, model = tiny_trie(), TableStub([3, 2], users=1, seed=0)
    users = torch.zeros(1, dtype=torch.long)
    level0 = model.begin(users)[0][0, 0]  # (3,) log-probs of the first codes
    plain = beam_search(model, users, trie, 1)
    cf = torch.full((1, 5), -30.0)
    cf[0, 2] = 0.0
    fused = beam_search(model, users, trie, 1, values=prefix_values(cf, item_prefix_nodes(trie), trie), value_weight=1.0)
    assert level0.exp().tolist() == pytest.approx([0.8446, 0.1349, 0.0205], abs=1e-4)  # seed 0: code 0 first
    assert plain.items.tolist() != [[2]] and fused.items.tolist() == [[2]]
    # weight 0 is the plain search exactly
    zero = beam_search(model, users, trie, 1, values=prefix_values(cf, item_prefix_nodes(trie), trie), value_weight=0.0)
    assert torch.equal(zero.items, plain.items) and torch.equal(zero.scores, plain.scores)


def test_level_soft_targets_are_the_teacher_mass_under_the_target_prefix():
    trie = tiny_trie()
    nodes = item_prefix_nodes(trie)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25], [0.1, 0.2, 0.3, 0.15, 0.25]])
    targets = torch.tensor([[2, 1], [0, 0]])  # row 0's target is item 4, row 1's item 0
    q = level_soft_targets(p.log(), nodes, trie, targets)
    assert q[0].exp()[0].tolist() == pytest.approx([0.3, 0.3, 0.4])  # level 1: every item counts
    assert q[1].exp()[0].tolist() == pytest.approx([0.15 / 0.4, 0.25 / 0.4])  # under prefix 2: items 3, 4
    assert q[1].exp()[1].tolist() == pytest.approx([0.1 / 0.3, 0.2 / 0.3])  # under prefix 0: items 0, 1
    # temperature 1/2 squares the masses before renormalising
    sharp = level_soft_targets(p.log(), nodes, trie, targets, temperature=0.5)
    assert sharp[1].exp()[0].tolist() == pytest.approx([0.15 ** 2 / (0.15 ** 2 + 0.25 ** 2), 0.25 ** 2 / (0.15 ** 2 + 0.25 ** 2)])
    # a code with no item under the prefix gets no mass: under prefix 1 only code 0 exists
    lone = level_soft_targets(p.log()[:1], nodes, trie, torch.tensor([[1, 0]]))
    assert lone[1].exp()[0].tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="temperature"):
        level_soft_targets(p.log(), nodes, trie, targets, temperature=0.0)


def test_sequence_loss_mixes_the_soft_label():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)]
    targets = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0]])
    hard = sequence_loss(logits, targets)
    one_hot = [torch.nn.functional.one_hot(targets[:, j], n).float().log() for j, n in enumerate((3, 2))]
    assert sequence_loss(logits, targets, one_hot, 0.7).item() == pytest.approx(hard.item())  # q = the one-hot
    uniform = [torch.full((4, n), -math.log(n)) for n in (3, 2)]
    by_hand = sum(0.5 * torch.nn.functional.cross_entropy(lg, targets[:, j])
                  - 0.5 * torch.log_softmax(lg, -1).mean(-1).mean() for j, lg in enumerate(logits))
    assert sequence_loss(logits, targets, uniform, 0.5).item() == pytest.approx(by_hand.item())
    assert sequence_loss(logits, targets, uniform, 0.0).item() == pytest.approx(hard.item())


def test_sequence_loss_with_a_prior_is_the_product_of_experts_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)]
    targets = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0]])
    prior = [torch.log_softmax(torch.randn(4, 3, generator=gen), -1), torch.tensor([[0.0, NEG_INF]] * 4)]
    by_hand = sum(torch.nn.functional.cross_entropy(lg + 0.5 * q, targets[:, j]) for j, (lg, q) in enumerate(zip(logits, prior)))
    # level 2 of rows 0 and 2 has target 1, which the prior rules out: a loss of +inf
    assert sequence_loss(logits, targets, prior=prior, prior_weight=0.5).item() == pytest.approx(by_hand.item())
    assert math.isinf(by_hand.item())
    fine = [prior[0], torch.log_softmax(torch.randn(4, 2, generator=gen), -1)]
    loss = sequence_loss(logits, targets, prior=fine, prior_weight=0.5)
    assert math.isfinite(loss.item()) and loss.item() != pytest.approx(sequence_loss(logits, targets).item())
    assert sequence_loss(logits, targets, prior=fine, prior_weight=0.0).item() == pytest.approx(sequence_loss(logits, targets).item())


def levelwise_scores(model, users, trie, cf, w):
    """Every item's sum over levels of log softmax over the allowed codes of (log pi + w V_cf), by brute force."""
    values = prefix_values(cf, item_prefix_nodes(trie), trie)
    logp0 = model.begin(users)[0][:, 0]  # (B, V_0)
    out = torch.full(cf.shape, NEG_INF)
    for b in range(cf.shape[0]):
        for item, (c0, c1) in enumerate(trie.ids.tolist()):
            root_kids = trie.children(0, torch.tensor(0))
            k0 = torch.where(root_kids >= 0, logp0[b] + w * values[0][b, root_kids.clamp_min(0)], NEG_INF)
            node = trie.next_nodes(0, torch.tensor(0), torch.tensor(c0))
            _, state = model.begin(users[b:b + 1])
            logp1 = model.advance(state, torch.zeros(1, 1, dtype=torch.long), torch.tensor([[c0]]), 0)[0][0, 0]
            kids = trie.children(1, node)
            k1 = torch.where(kids >= 0, logp1 + w * values[1][b, kids.clamp_min(0)], NEG_INF)
            out[b, item] = torch.log_softmax(k0, -1)[c0] + torch.log_softmax(k1, -1)[c1]
    return out


def test_a_wide_levelwise_search_is_the_exhaustive_per_level_product_of_experts():
    trie, model = tiny_trie(), TableStub([3, 2], users=2, seed=5)
    users = torch.arange(2)
    cf = torch.log_softmax(torch.randn(2, 5, generator=torch.Generator().manual_seed(2)), -1)
    res = beam_search(model, users, trie, 5, values=prefix_values(cf, item_prefix_nodes(trie), trie),
                      value_weight=0.8, value_mode="levelwise")
    expected = torch.sort(levelwise_scores(model, users, trie, cf, 0.8), dim=1, descending=True)
    assert torch.equal(res.items, expected.indices)
    assert torch.allclose(res.scores, expected.values, atol=1e-5)
    # the per-level distributions are normalised: the item probabilities sum to one per user
    assert torch.allclose(res.scores.exp().sum(1), torch.ones(2), atol=1e-5)
    # it is not the shallow rule (which reports log pi + w log p_cf)
    shallow = beam_search(model, users, trie, 5, values=prefix_values(cf, item_prefix_nodes(trie), trie), value_weight=0.8)
    assert not torch.allclose(shallow.scores, res.scores)
    with pytest.raises(ValueError, match="value_mode"):
        beam_search(model, users, trie, 5, values=prefix_values(cf, item_prefix_nodes(trie), trie), value_weight=0.8,
                    value_mode="deep")
