import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grc_core.beam_search import beam_search
from grc_core.beam_search import BeamResult
from grc_core.grc import (DecodeConfig, GRCModel, Reflection, SFTLossConfig, Template, _merge, backfill,
                          correction_start_scores, grc_decode, listed_drafts, reflection_entropy, sft_loss,
                          template_mask)
from grc_core.model import BackboneStepper, ModelConfig, Seq2Seq
from grc_core.trie import PrefixTrie
from tests.grc_core.test_model import LEVELS, batch_for, catalog

L = len(LEVELS)


def decode(**changes) -> DecodeConfig:
    """Plain two-pass decoding (every draft reflected on, a full correction, no EGRS, joint merge)
    with `changes`."""
    return DecodeConfig(**{"correct_width": 0, "alpha_e": 0.0, "reflect_width": 0, "rank_rule": "joint", "verify_gamma": 0.0,
                            "cf_weight": 0.0, **changes})


def tiny_grc(num_attrs=1, reflect=True, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, d_ff=32, n_heads=2, encoder_layers=1, decoder_layers=2, dropout=0.0,
                      layout="item", max_history=6)
    seq = Seq2Seq(cfg, LEVELS, attr_sizes=[3])
    model = GRCModel(seq, num_attrs, reflect)
    with torch.no_grad():  # larger weights than the init, so that every position matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def reference_mask(t: Template) -> torch.Tensor:
    """Built position by position from the template's rules."""
    s = t.length
    slots = set(range(t.first_slot, t.first_slot + t.num_slots))
    out = torch.zeros(s, s)
    for i in range(s):
        for j in range(s):
            visible = j <= i and not (i in slots and j in slots and i != j)
            out[i, j] = 0.0 if visible else float("-inf")
    return out


@pytest.mark.parametrize("k,reflect,length", [(0, True, 2 * L + 4), (2, True, 2 * L + 6), (2, False, 2 * L + 3)])
def test_template_length(k, reflect, length):
    assert Template(L, k, reflect).length == length


@pytest.mark.parametrize("k,reflect", [(0, True), (1, True), (3, True), (2, False)])
def test_mask_matches_reference(k, reflect):
    t = Template(L, k, reflect)
    assert torch.equal(template_mask(t), reference_mask(t))


def test_changing_a_later_slot_changes_no_other_slot():
    model = tiny_grc(num_attrs=2)
    table = catalog()
    batch = batch_for(table, [[0, 1, 2], [3, 4]], [5, 6])
    memory = model.seq.encode(batch)
    draft = table.codes[[7, 8]]
    r_loc, r_sem, target = torch.tensor([2, 4]), torch.tensor([[0, 1], [1, 1]]), batch.target_codes
    t = model.template
    x = model.template_inputs(draft, r_loc, r_sem, target)[:, :-1]
    mask = template_mask(t)[:-1, :-1]
    h0 = model.seq.decode(x, memory, mask)
    last = t.first_slot + t.num_slots - 1
    x2 = x.clone()
    x2[:, last] += torch.randn_like(x2[:, last])
    h1 = model.seq.decode(x2, memory, mask)
    assert not torch.allclose(h0[:, last], h1[:, last])  # the slot itself does change
    torch.testing.assert_close(h0[:, :last], h1[:, :last], atol=0, rtol=0)  # draft and earlier slots do not
    # and the first slot changes nothing in the later ones either
    x3 = x.clone()
    x3[:, t.first_slot] += 1.0
    h3 = model.seq.decode(x3, memory, mask)
    torch.testing.assert_close(h0[:, t.first_slot + 1 : t.eof2], h3[:, t.first_slot + 1 : t.eof2], atol=0, rtol=0)


def test_labels_reach_the_correction_only_through_eof2():
    model = tiny_grc(num_attrs=1)
    table = catalog()
    batch = batch_for(table, [[0, 1]], [5])
    memory = model.seq.encode(batch)
    draft, target = table.codes[[7]], batch.target_codes
    a = model(memory, draft, torch.tensor([1]), torch.tensor([[0]]), target)
    b = model(memory, draft, torch.tensor([3]), torch.tensor([[1]]), target)
    for x, y in zip(a.draft + a.reflect, b.draft + b.reflect):
        torch.testing.assert_close(x, y, atol=0, rtol=0)  # draft and reflection do not see the labels
    assert not torch.allclose(a.correct[0], b.correct[0])


def test_sft_loss_modes_and_gradients():
    model = tiny_grc(num_attrs=1).train()
    table = catalog()
    batch = batch_for(table, [[0, 1, 2], [3, 4]], [5, 6])
    draft = table.codes[torch.tensor([[7, 8, 9], [10, 11, 5]])]  # (B=2, M=3, L)
    r_loc = torch.tensor([[1, 2, 4], [3, 1, 4]])
    r_sem = torch.tensor([[[0], [1], [1]], [[0], [0], [1]]])
    losses = {}
    for mode in ["target", "draft", "none"]:
        loss, parts = sft_loss(model, batch, draft, r_loc, r_sem, SFTLossConfig(1.2, mode))
        losses[mode] = loss.item()
        assert torch.isfinite(loss)
        assert loss.item() == pytest.approx(parts["mle"] + 1.2 * (parts["reflect"] + parts["correct"]), rel=1e-5)
    assert losses["none"] < min(losses["target"], losses["draft"])
    assert losses["target"] != losses["draft"]
    loss, _ = sft_loss(model, batch, draft, r_loc, r_sem, SFTLossConfig(1.2, "target"))
    loss.backward()
    assert model.loc_head.weight.grad.abs().sum() > 0 and model.slots.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="draft_loss"):
        sft_loss(model, batch, draft, r_loc, r_sem, SFTLossConfig(1.2, "bogus"))


def test_merge_dedups_by_best_score_and_pads():
    items = torch.tensor([[3, 5, 3, -1, 7], [2, 2, 2, 2, 2]])
    scores = torch.tensor([[-1.0, -0.5, -0.2, float("-inf"), -3.0], [-1.0, -2.0, -0.5, -4.0, -3.0]])
    out_items, out_scores = _merge(items, scores, 4)
    assert out_items.tolist() == [[3, 5, 7, -1], [2, -1, -1, -1]]
    torch.testing.assert_close(out_scores[0, :3], torch.tensor([-0.2, -0.5, -3.0]))
    assert out_scores[1, 0].item() == pytest.approx(-0.5)


def _setup(num_attrs=1, reflect=True, seed=0):
    model, table = tiny_grc(num_attrs, reflect, seed), catalog()
    trie = PrefixTrie.from_ids(table.codes.numpy(), LEVELS)
    batch = batch_for(table, [[0, 1, 2], [3], [4, 5, 6, 7]], [8, 9, 10])._replace(target_codes=None)
    return model, table, trie, batch


@pytest.mark.parametrize("reflect", [True, False])
@torch.inference_mode()
def test_two_pass_matches_the_teacher_forced_template(reflect):
    # KV reuse parity: the reflection of every draft, and the score of every corrected item,
    # equal what one teacher-forced pass over the full template computes.
    model, table, trie, batch = _setup(num_attrs=1, reflect=reflect)
    width = 6
    res = grc_decode(model, batch, trie, decode(width=width, alpha_e=0.3))
    drafts = res.drafts
    assert torch.equal(drafts.items, beam_search(BackboneStepper(model.seq), batch, trie, width).items)
    memory = model.seq.encode(batch)
    b = batch.history_codes.shape[0]
    for u in range(b):
        mem_u = type(memory)([k[u : u + 1] for k in memory.keys], [v[u : u + 1] for v in memory.values],
                             memory.mask[u : u + 1])
        for w in range(width):
            d = drafts.codes[u, w]
            if drafts.items[u, w] < 0:
                continue
            r = res.reflection[u, w]
            r_loc = r[0:1] if reflect else torch.tensor([1])
            r_sem = r[None, 1:] if reflect else torch.zeros(1, 1, dtype=torch.long)
            out = model(mem_u, d[None], r_loc, r_sem, d[None])
            if reflect:
                refl = [lg[0] for lg in out.reflect]
                assert int(refl[0].argmax()) + 1 == int(r[0])
                assert int(refl[1].argmax()) == int(r[1])
                ent = torch.stack([-(F.softmax(x, -1) * F.log_softmax(x, -1)).sum() for x in refl]).mean()
                assert float(ent) == pytest.approx(float(res.entropy[u, w]), abs=1e-5)
        for j in range(width):
            item, src = int(res.corrected.items[u, j]), int(res.source[u, j])
            if item < 0:
                continue
            d = drafts.codes[u, src]
            r = res.reflection[u, src]
            r_loc = r[0:1] if reflect else torch.tensor([1])
            r_sem = r[None, 1:] if reflect else torch.zeros(1, 1, dtype=torch.long)
            g = table.codes[item]
            out = model(mem_u, d[None], r_loc, r_sem, g[None])
            corr = sum(float(F.log_softmax(out.correct[lv][0], -1)[g[lv]]) for lv in range(L))
            expect = float(drafts.scores[u, src]) + 0.3 * float(res.entropy[u, src]) + corr
            assert float(res.corrected.scores[u, j]) == pytest.approx(expect, abs=1e-4)


def test_drafts_judged_correct_are_kept_as_they_are():
    model, table, trie, batch = _setup(num_attrs=1)
    with torch.no_grad():
        model.loc_head.bias[L] = 1e4  # every draft's reflection says r_loc = L+1
    res = grc_decode(model, batch, trie, decode(width=5))
    assert (res.reflection[..., 0][res.drafts.items >= 0] == L + 1).all()
    assert (res.corrected.items == -1).all()
    assert torch.equal(res.items, res.drafts.items)
    assert torch.equal(res.scores, res.drafts.scores)


def test_final_list_is_distinct_valid_and_full():
    model, table, trie, batch = _setup(num_attrs=1, seed=3)
    width = 10
    res = grc_decode(model, batch, trie, decode(width=width, correct_width=4))
    n_items = table.codes.shape[0]
    for row in res.items.tolist():
        real = [i for i in row if i >= 0]
        assert len(real) == len(set(real)) == width  # 25 items in the catalog: the list is full
        assert all(0 <= i < n_items for i in real)
    assert res.corrected.items.shape == (3, 4)
    # corrected items keep their search scores, sorted, at the head of the list
    finite = res.scores[res.scores > float("-inf")]
    assert finite.numel() > 0


def test_egrs_alpha_changes_only_the_correction_start():
    model, table, trie, batch = _setup(num_attrs=1, seed=4)
    a = grc_decode(model, batch, trie, decode(width=6, alpha_e=0.0))
    b = grc_decode(model, batch, trie, decode(width=6, alpha_e=0.0))
    c = grc_decode(model, batch, trie, decode(width=6, alpha_e=5.0))
    assert torch.equal(a.items, b.items) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.drafts.items, c.drafts.items) and torch.equal(a.reflection, c.reflection)
    assert not torch.equal(a.corrected.scores, c.corrected.scores)


def test_reflection_stats_by_hand():
    from grc_core.beam_search import BeamResult
    from grc_core.data import ItemTable
    from grc_core.evaluation import ReflectionStats
    from grc_core.grc import GRCResult

    # 4 items with 2-level IDs; item 0 is the target.
    table = ItemTable(torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]), torch.tensor([[5], [5], [6], [5]]))
    drafts = BeamResult(torch.tensor([[1, 2, 0]]), torch.tensor([[-1.0, -2.0, -3.0]]),
                        table.codes[torch.tensor([[1, 2, 0]])])
    # true r_loc: item 1 -> 2, item 2 -> 1, item 0 -> 3 (correct); true r_cat: 1, 0, 1
    reflection = torch.tensor([[[2, 1], [2, 0], [3, 0]]])  # loc right, wrong, right; cat right, right, wrong
    corrected = BeamResult(torch.tensor([[0, 1, 3]]), torch.tensor([[-1.5, -2.5, -4.0]]),
                           table.codes[torch.tensor([[0, 1, 3]])])
    source = torch.tensor([[0, 1, 1]])  # draft 0 (item 1) -> item 0: a fix; draft 1 (item 2) -> item 1 then 3
    res = GRCResult(torch.tensor([[0, 1, 3]]), torch.zeros(1, 3), drafts, reflection, torch.zeros(1, 3),
                    corrected, source, torch.zeros(1, 3))
    stats = ReflectionStats(ks=(2, 3))
    stats.update(res, torch.tensor([0]), table)
    s = stats.summary()
    assert s["acc_loc@2"] == pytest.approx(1 / 2) and s["acc_loc@3"] == pytest.approx(2 / 3)
    assert s["acc_cat@2"] == pytest.approx(1.0) and s["acc_cat@3"] == pytest.approx(2 / 3)
    assert s["copy_rate"] == 0.0  # no corrected item equals its draft
    assert s["fix_rate"] == pytest.approx(1 / 2)  # two wrong drafts corrected, one fixed
    assert math.isnan(s["break_rate"])  # the right draft (item 0) was not corrected
    assert s["corrected_share@10"] == pytest.approx(2 / 3)


def test_union_rule_keeps_every_draft_that_outscores_the_list_tail():
    model, table, trie, batch = _setup(num_attrs=1, seed=5)
    res = grc_decode(model, batch, trie, decode(width=8, rank_rule="union"))
    for u in range(3):
        scores = res.scores[u][res.scores[u] > float("-inf")]
        assert torch.equal(scores, scores.sort(descending=True).values)
        floor = float(scores.min())
        strong = {int(i) for i, sc in zip(res.drafts.items[u], res.drafts.scores[u]) if float(sc) > floor}
        assert strong <= set(res.items[u].tolist())
        # and each listed draft carries at least its draft score
        for i, sc in zip(res.drafts.items[u].tolist(), res.drafts.scores[u].tolist()):
            if i in res.items[u].tolist():
                assert float(res.scores[u, res.items[u].tolist().index(i)]) >= sc - 1e-6


def test_egrs_gives_the_correction_budget_to_the_most_uncertain_drafts():
    model, table, trie, batch = _setup(num_attrs=1, seed=6)
    plain = grc_decode(model, batch, trie, decode(width=8, correct_width=3, alpha_e=0.0))
    egrs = grc_decode(model, batch, trie, decode(width=8, correct_width=3, alpha_e=1e4))
    for u in range(3):
        open_ = (plain.reflection[u, :, 0] <= L) & (plain.drafts.items[u] >= 0)  # drafts that go to correction
        ent = plain.entropy[u].masked_fill(~open_, float("-inf"))
        top = set(ent.topk(min(3, int(open_.sum()))).indices.tolist())
        got = {int(s) for s in egrs.source[u].tolist() if s >= 0}
        assert got <= top  # with a huge alpha_e only the highest-entropy drafts survive the first pruning


def test_marginal_rule_sums_the_mixture_over_the_beams():
    from grc_core.grc import _sum_per_item

    items = torch.tensor([[4, 2, 4, -1, 2, 4]])
    scores = torch.log(torch.tensor([[0.1, 0.2, 0.05, 0.3, 0.01, 0.02]]))
    out = _sum_per_item(items, scores, n_items=6)
    expect = torch.log(torch.tensor([[0.17, 0.21, 0.17, 0.3, 0.21, 0.17]]))
    torch.testing.assert_close(out[0, [0, 1, 2, 4, 5]], expect[0, [0, 1, 2, 4, 5]])
    assert out[0, 3] == scores[0, 3]  # padding untouched

    model, table, trie, batch = _setup(num_attrs=1, seed=7)
    res = grc_decode(model, batch, trie, decode(width=6, rank_rule="marginal"))
    # brute force from the returned pieces: p(i) = sum_b p(b) q_b 1(i=b) + sum over corrected beams
    with torch.inference_mode():
        for u in range(3):
            total = {}
            mem = model.seq.encode(batch)
            mem_u = type(mem)([k[u : u + 1] for k in mem.keys], [v[u : u + 1] for v in mem.values], mem.mask[u : u + 1])
            for w in range(6):
                d, r = res.drafts.codes[u, w], res.reflection[u, w]
                out_ = model(mem_u, d[None], r[0:1], r[None, 1:], d[None])
                q = torch.softmax(out_.reflect[0][0], -1)[L]
                item = int(res.drafts.items[u, w])
                total[item] = total.get(item, 0.0) + float(res.drafts.scores[u, w].exp() * q)
            for j in range(6):
                item = int(res.corrected.items[u, j])
                if item >= 0:
                    total[item] = total.get(item, 0.0) + float(res.corrected.scores[u, j].exp())
            for item, sc in zip(res.items[u].tolist(), res.scores[u].tolist()):
                if sc > float("-inf"):
                    assert sc == pytest.approx(float(torch.log(torch.tensor(total[item]))), abs=1e-4)


@pytest.mark.parametrize("rule", ["joint", "union", "marginal"])
def test_reflection_budget_touches_only_the_best_drafts(rule):
    model, table, trie, batch = _setup(num_attrs=1, seed=8)
    full = grc_decode(model, batch, trie, decode(width=8, rank_rule=rule))
    same = grc_decode(model, batch, trie, decode(width=8, rank_rule=rule, reflect_width=8))
    assert torch.equal(full.items, same.items) and torch.equal(full.scores, same.scores)
    part = grc_decode(model, batch, trie, decode(width=8, rank_rule=rule, reflect_width=3, correct_width=3))
    assert torch.equal(part.reflection[:, :3], full.reflection[:, :3])  # same reflection on the reflected drafts
    assert (part.reflection[:, 3:] == 0).all() and (part.entropy[:, 3:] == 0).all()
    assert (part.source < 3).all()  # corrections come only from the reflected drafts
    for u in range(3):  # every unreflected draft is still listed, with its own score
        listed = dict(zip(part.items[u].tolist(), part.scores[u].tolist()))
        for i, sc in zip(part.drafts.items[u, 3:].tolist(), part.drafts.scores[u, 3:].tolist()):
            if i in listed and rule != "marginal":
                assert listed[i] >= sc - 1e-6


@pytest.mark.parametrize("field,value", [("width", 0), ("width", 2.0), ("width", True), ("correct_width", -1),
                                         ("reflect_width", -2), ("reflect_width", 1.5), ("alpha_e", -0.1),
                                         ("alpha_e", float("nan")), ("alpha_e", float("inf")),
                                         ("rank_rule", "bogus"), ("rank_rule", "Joint")])
def test_decode_config_rejects_bad_settings_at_construction(field, value):
    with pytest.raises(ValueError, match=f"DecodeConfig.{field} .*got {value!r}"):
        decode(**{"width": 4, field: value})


def test_decode_config_accepts_the_edges():
    for rule in ["joint", "union", "marginal", "verify"]:
        DecodeConfig(width=1, correct_width=0, alpha_e=0, reflect_width=0, rank_rule=rule, verify_gamma=0.0,
                     cf_weight=0.0)
    decode(width=np.int64(3), correct_width=np.int64(2), alpha_e=np.float32(0.2))


def _reflection(labels, logps, n_levels):
    """A Reflection as `reflect` builds it from argmax labels and slot log-probs."""
    return Reflection(labels, logps, labels[..., 0] == n_levels + 1, logps[0][..., n_levels])


def test_reflection_entropy_by_hand():
    # One draft, L = 3: r_loc uniform over L+1 = 4 classes (entropy log 4), r_sem (1/2, 1/2) (log 2);
    # Eq. 24 averages the T_r = 2 slots: (log 4 + log 2) / 2 = 1.5 log 2.
    loc = torch.full((1, 1, 4), 0.25).log()
    sem = torch.full((1, 1, 2), 0.5).log()
    refl = _reflection(torch.tensor([[[1, 0]]]), [loc, sem], n_levels=3)
    assert float(reflection_entropy(refl)[0, 0]) == pytest.approx(1.5 * math.log(2), abs=1e-6)
    gc = Reflection(torch.zeros(2, 3, 0, dtype=torch.long), [], torch.zeros(2, 3, dtype=torch.bool),
                    torch.full((2, 3), float("-inf")))
    assert torch.equal(reflection_entropy(gc), torch.zeros(2, 3))  # no slots: no entropy


def test_correction_start_scores_by_hand():
    # Two drafts, L = 1 (r_loc in {1, 2}, 2 = "correct"): draft 0 judged wrong with q = 0.25,
    # draft 1 judged correct with q = 0.75; scores -1, -2; entropies 0.5, 0.1; alpha_e 2.
    q = torch.tensor([[0.25, 0.75]])
    logps = [torch.stack([1 - q, q], -1).log()]  # (1, 2, 2)
    refl = _reflection(torch.tensor([[[1], [2]]]), logps, n_levels=1)
    scores, entropy = torch.tensor([[-1.0, -2.0]]), torch.tensor([[0.5, 0.1]])
    joint = correction_start_scores(scores, refl, entropy, 2.0, "joint")
    # Eq. 25: -1 + 2 * 0.5 = 0; the draft judged correct does not go to correction
    assert joint.tolist() == [[0.0, float("-inf")]]
    assert torch.equal(correction_start_scores(scores, refl, entropy, 2.0, "union"), joint)
    marginal = correction_start_scores(scores, refl, entropy, 2.0, "marginal")
    # every draft goes, weighted by p(wrong): 0 + log 0.75 and -2 + 0.2 + log 0.25
    torch.testing.assert_close(marginal, torch.tensor([[math.log(0.75), -1.8 + math.log(0.25)]]), atol=1e-6, rtol=0)


def test_listed_drafts_by_hand():
    # W = 3 drafts, R = 2 reflected: draft 0 judged wrong (q = 0.25), draft 1 judged correct
    # (q = 0.75); draft 2 beyond the reflection budget.
    q = torch.tensor([[0.25, 0.75]])
    refl = _reflection(torch.tensor([[[1], [2]]]), [torch.stack([1 - q, q], -1).log()], n_levels=1)
    drafts = BeamResult(torch.tensor([[7, 4, 9]]), torch.tensor([[-1.0, -2.0, -3.0]]), torch.zeros(1, 3, 1))
    items, scores = listed_drafts(drafts, refl, "joint")
    assert items.tolist() == [[-1, 4, 9]] and scores.tolist() == [[float("-inf"), -2.0, -3.0]]
    items, scores = listed_drafts(drafts, refl, "union")
    assert items.tolist() == [[7, 4, 9]] and scores.tolist() == [[-1.0, -2.0, -3.0]]
    items, scores = listed_drafts(drafts, refl, "marginal")  # kept with probability q: score + log q
    assert items.tolist() == [[7, 4, 9]]
    torch.testing.assert_close(scores, torch.tensor([[-1 + math.log(0.25), -2 + math.log(0.75), -3.0]]),
                               atol=1e-6, rtol=0)


def test_backfill_appends_missing_drafts_in_draft_order():
    drafts = BeamResult(torch.tensor([[5, 3, 8, -1]]), torch.tensor([[-1.0, -2.0, -3.0, float("-inf")]]),
                        torch.zeros(1, 4, 1))
    items = torch.tensor([[3, 6, -1, -1]])  # 3 is a draft already listed, 6 a correction
    scores = torch.tensor([[-0.5, -0.7, float("-inf"), float("-inf")]])
    out, out_scores = backfill(items, scores, drafts, 4)
    assert out.tolist() == [[3, 6, 5, 8]]  # drafts 5 and 8, in draft order, fill the padding
    assert torch.equal(out_scores, scores)  # backfilled drafts keep score -inf


def test_verify_order_by_hand():
    from grc_core.grc import verify_order

    # one user, W = 4 drafts, R = 3 reflected; draft scores -1, -2, -3, -4; log q = log .1, log .9, log .5
    drafts = BeamResult(torch.tensor([[10, 11, 12, 13]]), torch.tensor([[-1.0, -2.0, -3.0, -4.0]]),
                        torch.zeros(1, 4, L, dtype=torch.long))
    log_right = torch.log(torch.tensor([[0.1, 0.9, 0.5]]))
    refl = Reflection(torch.zeros(1, 3, 2, dtype=torch.long), [], torch.zeros(1, 3, dtype=torch.bool), log_right)
    # gamma 2: keys -1 + 2 ln .1 = -5.605, -2 + 2 ln .9 = -2.211, -3 + 2 ln .5 = -4.386 -> 11, 12, 10; 13 stays last
    items, scores = verify_order(drafts, refl, gamma=2.0)
    assert items.tolist() == [[11, 12, 10, 13]]
    torch.testing.assert_close(scores, torch.tensor([[-2.0 + 2 * math.log(0.9), -3.0 + 2 * math.log(0.5),
                                                      -1.0 + 2 * math.log(0.1), -4.0]]))
    items0, scores0 = verify_order(drafts, refl, gamma=0.0)  # gamma 0: the backbone's order
    assert items0.tolist() == [[10, 11, 12, 13]] and torch.equal(scores0, drafts.scores)


def test_verify_rule_reorders_the_drafts_and_skips_correction():
    model, table, trie, batch = _setup(num_attrs=1, seed=5)
    res = grc_decode(model, batch, trie, decode(width=8, rank_rule="verify", verify_gamma=3.0))
    assert res.corrected.items.shape[1] == 0
    for u in range(3):
        assert sorted(res.items[u].tolist()) == sorted(res.drafts.items[u].tolist())  # a permutation of the drafts
        key = res.drafts.scores[u] + 3.0 * res.log_right[u]
        live = res.drafts.items[u] >= 0
        expected = res.drafts.items[u][live][key[live].sort(descending=True, stable=True).indices]
        assert res.items[u][: int(live.sum())].tolist() == expected.tolist()


def test_grc_with_a_collaborative_value_fuses_both_passes():
    from grc_core.cf_value import item_prefix_nodes, prefix_values

    model, table, trie, batch = _setup(num_attrs=1, seed=7)
    n_items = trie.ids.shape[0]
    gen = torch.Generator().manual_seed(3)
    item_logp = torch.log_softmax(torch.randn(3, n_items, generator=gen) * 3, -1)  # (B, N)
    plain = grc_decode(model, batch, trie, decode(width=6, rank_rule="union"))
    fused = grc_decode(model, batch, trie, decode(width=6, rank_rule="union", cf_weight=2.0), item_logp=item_logp)
    # the drafts are tiger_cf's beam
    values = prefix_values(item_logp, item_prefix_nodes(trie), trie)
    cf_beam = beam_search(BackboneStepper(model.seq), batch, trie, 6, values=values, value_weight=2.0)
    assert torch.equal(fused.drafts.items, cf_beam.items)
    torch.testing.assert_close(fused.drafts.scores, cf_beam.scores)
    assert not torch.equal(fused.items, plain.items)
    # every correction ends at its start + log pi_cor + 2 log p_cf(item): its fused score minus
    # 2 log p_cf is the unfused correction score, below the draft's fused score it started from
    live = fused.corrected.items >= 0
    rows = torch.arange(3)[:, None].expand_as(live)
    cf_part = 2.0 * item_logp[rows[live], fused.corrected.items[live]]
    start = fused.drafts.scores.gather(1, fused.source.clamp_min(0))[live]
    assert bool(((fused.corrected.scores[live] - cf_part) <= start + 1e-5).all())
    with pytest.raises(ValueError, match="needs the collaborative model's item_logp"):
        grc_decode(model, batch, trie, decode(width=6, cf_weight=2.0))


def _ved(**kw):
    from grc_core.config import VEDConfig

    return VEDConfig(**{"init_beam": 2, "candidates": 1, "budget": 12, "entropy_weight": 0.1, "ucb_beta": 1.0,
                        "expand": "greedy", "max_iters": 50, **kw})


@pytest.mark.parametrize("cf_weight", [0.0, 2.0])
@torch.inference_mode()
def test_given_drafts_reproduce_the_beams_two_pass_decode(cf_weight):
    # The beam's own drafts handed back as `draft_items`, shuffled: the teacher-forced scores and cache
    # give the same drafts, reflections, corrections and final list as the beam's incremental cache.
    model, table, trie, batch = _setup(num_attrs=1, seed=5)
    n_items = trie.ids.shape[0]
    item_logp = torch.log_softmax(torch.randn(3, n_items, generator=torch.Generator().manual_seed(1)) * 3, -1)
    cfg = decode(width=7, rank_rule="union", alpha_e=0.3, cf_weight=cf_weight)
    beam = grc_decode(model, batch, trie, cfg, item_logp=item_logp)
    shuffled = beam.drafts.items[:, torch.randperm(7, generator=torch.Generator().manual_seed(2))]
    given = grc_decode(model, batch, trie, decode(width=7, rank_rule="union", alpha_e=0.3, cf_weight=cf_weight,
                                                  draft_ved=_ved()), item_logp=item_logp, draft_items=shuffled)
    assert torch.equal(given.drafts.items, beam.drafts.items)
    assert torch.equal(given.drafts.codes, beam.drafts.codes)
    torch.testing.assert_close(given.drafts.scores, beam.drafts.scores, atol=1e-5, rtol=0)
    assert torch.equal(given.reflection, beam.reflection)
    torch.testing.assert_close(given.entropy, beam.entropy, atol=1e-5, rtol=0)
    assert torch.equal(given.corrected.items, beam.corrected.items)
    torch.testing.assert_close(given.corrected.scores, beam.corrected.scores, atol=1e-4, rtol=0)
    assert torch.equal(given.items, beam.items)


@torch.inference_mode()
def test_given_drafts_pad_short_lists_and_need_the_ved_setting():
    model, table, trie, batch = _setup(num_attrs=1, seed=6)
    items = torch.tensor([[3, -1, 0], [5, 6, -1], [-1, -1, -1]])
    res = grc_decode(model, batch, trie, decode(width=5, rank_rule="union", draft_ved=_ved()), draft_items=items)
    assert sorted(res.drafts.items[0, :2].tolist()) == [0, 3] and res.drafts.items[2].tolist() == [-1] * 5
    assert (res.drafts.items[:, 2:][:2] == -1).all() and (res.drafts.codes[res.drafts.items < 0] == -1).all()
    assert torch.isinf(res.drafts.scores[res.drafts.items < 0]).all()
    assert torch.isfinite(res.drafts.scores[res.drafts.items >= 0]).all()
    for row in res.items[:2].tolist():  # corrections of the drafts fill the list: distinct real items
        real = [i for i in row if i >= 0]
        assert len(real) == len(set(real)) == 5
    assert res.items[2].tolist() == [-1] * 5  # no draft, nothing to correct
    with pytest.raises(ValueError, match="draft_items are given exactly when"):
        grc_decode(model, batch, trie, decode(width=5), draft_items=items)
    with pytest.raises(ValueError, match="draft_items are given exactly when"):
        grc_decode(model, batch, trie, decode(width=5, draft_ved=_ved()))
    with pytest.raises(ValueError, match="draft_ved must be a VEDConfig"):
        decode(width=5, draft_ved={"init_beam": 2})


def test_rank_with_grc_draws_its_drafts_by_ved_with_sasrecs_value():
    from grc_core.cf_value import item_prefix_nodes, prefix_values
    from grc_core.data import make_instances
    from grc_core.evaluation import history_mask, rank_with_grc
    from grc_core.ved import CFValue, ved_decode

    model, table, trie, _ = _setup(num_attrs=1, seed=8)
    inst = make_instances(range(3), [[0, 1, 2], [3], [4, 5, 6, 7]], [8, 9, 10], max_len=6)
    n_items = trie.ids.shape[0]
    logp_all = torch.log_softmax(torch.randn(3, n_items, generator=torch.Generator().manual_seed(4)) * 3, -1)
    item_logp = lambda part: logp_all[part.user]  # noqa: E731
    ved_cfg = _ved(init_beam=2, budget=10)
    cfg = decode(width=8, rank_rule="union", cf_weight=1.0, draft_ved=ved_cfg)
    items, _ = rank_with_grc(model, inst, table, trie, cfg, batch_size=2, exclude_history=True, item_logp=item_logp)
    # the drafts are VED's candidates under V_cf, then reflected on and corrected
    exclude = history_mask(inst.history, n_items)
    batch = to_batch_for(inst, table)
    value = CFValue(prefix_values(logp_all, item_prefix_nodes(trie), trie, exclude))
    from dataclasses import replace
    found = ved_decode(model.seq, batch, trie, replace(ved_cfg, candidates=8), value, exclude)
    with torch.inference_mode():
        direct = grc_decode(model, batch, trie, cfg, exclude, logp_all, found.items)
    assert items.tolist() == direct.items.tolist()
    assert set(direct.drafts.items[0].tolist()) - {-1} == set(found.items[0].tolist()) - {-1}
    for u, row in enumerate(items.tolist()):
        real = [i for i in row if i >= 0]
        assert len(real) == len(set(real)) and not set(real) & set(inst.history[u][inst.history[u] >= 0].tolist())
    beam_drafts = grc_decode(model, batch, trie, replace(cfg, draft_ved=None), exclude, logp_all).drafts.items
    assert not torch.equal(direct.drafts.items, beam_drafts)  # VED's tree is not the beam
    with pytest.raises(ValueError, match="need the collaborative model's item_logp"):
        rank_with_grc(model, inst, table, trie, replace(cfg, cf_weight=0.0), batch_size=2)


def to_batch_for(inst, table):
    from grc_core.data import to_batch

    return to_batch(inst, table, with_target=False)
