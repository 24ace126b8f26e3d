import numpy as np
import pytest
import torch

from grc_core.beam_search import beam_search, exhaustive_topk
from grc_core.data import PAD, ItemTable, by_history_length, make_instances, pad_histories, to_batch
from grc_core.evaluation import dense_item_logp, rank_with_backbone
from grc_core.model import (BackboneStepper, Memory, ModelConfig, Seq2Seq, causal_mask, count_flops_per_sample,
                            decoder_step, reference_decode, sequence_loss)
from grc_core.trie import PrefixTrie

LEVELS = [4, 3, 5]


def tiny(layout="item", seed=0, item_embedding=False, n_items=25, dense_head=False):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, d_ff=32, n_heads=2, encoder_layers=1, decoder_layers=2, dropout=0.0,
                      layout=layout, max_history=6, item_embedding=item_embedding, dense_head=dense_head)
    return Seq2Seq(cfg, LEVELS, attr_sizes=[3], n_items=n_items).eval()


def catalog(n=25, seed=1):
    rng = np.random.default_rng(seed)
    all_ids = np.array([(a, b, c) for a in range(4) for b in range(3) for c in range(5)])
    ids = all_ids[rng.choice(len(all_ids), n, replace=False)]
    attrs = rng.integers(0, 3, size=(n, 1))
    return ItemTable(torch.as_tensor(ids), torch.as_tensor(attrs))


def batch_for(table, histories, targets):
    inst = make_instances(range(len(histories)), histories, targets, max_len=6)
    return to_batch(inst, table)


def test_pad_histories_left_pads_and_keeps_the_most_recent():
    out = pad_histories([[1, 2], [3, 4, 5, 6, 7, 8, 9]], max_len=4)
    assert out.tolist() == [[PAD, PAD, 1, 2], [6, 7, 8, 9]]


def test_to_batch_zeroes_padding_and_looks_up_codes():
    table = catalog()
    b = batch_for(table, [[0, 1, 5], [2]], [3, 4])
    # Padded to 6, then the 3 columns that are padding in every row are dropped.
    assert b.history_mask.tolist() == [[True] * 3, [False] * 2 + [True]]
    assert torch.equal(b.history_codes[0, -1], table.codes[5])
    assert b.history_codes[1, :2].abs().sum() == 0
    assert torch.equal(b.target_codes, table.codes[[3, 4]])


@pytest.mark.parametrize("layout", ["item", "code"])
def test_narrow_batches_mean_what_the_full_window_means(layout):
    # Positions are counted from the end of the window: the batch trimmed to its longest history
    # (2 items), and the same histories padded to a window of 4 or the model's full 6, score alike.
    model, table = tiny(layout), catalog()
    stepper = BackboneStepper(model)
    histories = [[1, 2], [7]]
    inst = make_instances([0, 1], histories, [3, 3], max_len=6)
    trimmed = to_batch(inst, table, with_target=False)
    assert trimmed.history_mask.shape == (2, 2)
    assert to_batch(inst, table, trim=False).history_mask.shape == (2, 6)
    got, _ = stepper.begin(trimmed)
    for width in (4, 6):
        full = make_instances([0, 1], histories, [3, 3], max_len=width)
        want, _ = stepper.begin(to_batch(full, table, with_target=False, trim=False))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["item", "code"])
def test_stepper_matches_the_full_teacher_forced_decoder(layout):
    # The KV-cached step path must give the log-probs of the full-sequence forward pass.
    model, table = tiny(layout), catalog()
    batch = batch_for(table, [[0, 1, 2], [3], [4, 5, 6, 7]], [8, 9, 10])
    full = [torch.log_softmax(lg, -1) for lg in model(batch)]
    stepper = BackboneStepper(model)
    logp, state = stepper.begin(batch._replace(target_codes=None))
    torch.testing.assert_close(logp[:, 0], full[0], atol=1e-5, rtol=0)
    parents = torch.zeros(3, 1, dtype=torch.long)
    for level in range(len(LEVELS) - 1):
        tokens = batch.target_codes[:, level : level + 1]  # (B, 1)
        logp, state = stepper.advance(state, parents, tokens, level)
        torch.testing.assert_close(logp[:, 0], full[level + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["item", "code"])
@pytest.mark.parametrize("masked", [False, True])
@torch.no_grad()
def test_decoder_step_in_chunks_matches_the_reference_decoder(layout, masked):
    # The one cached decoder path, fed 2, then 1, then 3 positions for W = 2 beams per user, gives
    # what the explicit-attention reference computes for the whole sequence at once.
    model, table = tiny(layout), catalog()
    batch = batch_for(table, [[0, 1, 2], [3], [4, 5, 6, 7]], [8, 9, 10])
    memory = model.encode(batch)
    b, w, s, d = 3, 2, 6, model.cfg.d_model
    x = torch.randn(b, w, s, d, generator=torch.Generator().manual_seed(0))  # (B, W, S, D)
    mask = causal_mask(s, x.device, x.dtype)  # (S, S)
    if masked:  # positions 2 and 3 blind to each other, like two reflection slots
        mask[3, 2] = float("-inf")
    start = 1
    flat = x.view(b * w, s, d)
    rep = lambda t: t.repeat_interleave(w, 0)  # noqa: E731  each user's memory for its W beams
    rows = Memory([rep(k) for k in memory.keys], [rep(v) for v in memory.values], rep(memory.mask))
    expect = reference_decode(model, flat, rows, mask, start).view(b, w, s, d)
    torch.testing.assert_close(model.decode(flat, rows, mask, start).view(b, w, s, d), expect, atol=1e-5, rtol=0)
    keys, values, got = [], [], []
    for lo, hi in [(0, 2), (2, 3), (3, 6)]:
        h, keys, values = decoder_step(model, memory, keys, values, x[:, :, lo:hi], start + lo, mask[lo:hi, :hi])
        got.append(h)  # (B, W, C, D)
        assert keys[0].shape == (b, w, model.cfg.n_heads, hi, d // model.cfg.n_heads)
    torch.testing.assert_close(torch.cat(got, 2), expect, atol=1e-5, rtol=0)


def test_beam_search_over_the_real_model_equals_exhaustive_scoring():
    model, table = tiny(), catalog()
    trie = PrefixTrie.from_ids(table.codes.numpy(), LEVELS)
    batch = batch_for(table, [[0, 1, 2], [3], [4, 5, 6, 7]], [8, 9, 10])._replace(target_codes=None)
    stepper = BackboneStepper(model)
    beam = beam_search(stepper, batch, trie, width=25)  # the whole catalog fits in the beam
    exact = exhaustive_topk(stepper, batch, trie, k=25)
    assert torch.equal(beam.items, exact.items)
    torch.testing.assert_close(beam.scores, exact.scores, atol=1e-5, rtol=0)
    assert set(beam.items[0].tolist()) == set(range(25))


@pytest.mark.parametrize("item_embedding", [False, True])
def test_padding_does_not_change_the_scores_of_a_history(item_embedding):
    model, table = tiny(item_embedding=item_embedding), catalog()
    stepper = BackboneStepper(model)
    a, _ = stepper.begin(batch_for(table, [[1, 2]], [3])._replace(target_codes=None))
    # The same history inside a batch with a longer one: its row must not change.
    b, _ = stepper.begin(batch_for(table, [[1, 2], [4, 5, 6, 7, 8, 9]], [3, 3])._replace(target_codes=None))
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["item", "code"])
def test_histories_wider_than_the_backbone_was_built_for_are_refused_by_name(layout):
    model, table = tiny(layout), catalog()
    wide = to_batch(make_instances([0], [list(range(8))], [9], max_len=8), table)  # 8 items > max_history 6
    with pytest.raises(ValueError, match=r"histories of 8 items.*at most 6.*data.max_history=6"):
        model.encode(wide)
    model.encode(batch_for(table, [[1, 2]], [3]))  # 6: accepted


@pytest.mark.parametrize("layout", ["item", "code"])
def test_the_item_embedding_tells_apart_items_with_the_same_codes(layout):
    # Items 0 and 1 share their codes and attributes: only their own embeddings tell them apart.
    table = catalog()
    table = ItemTable(table.codes.clone(), table.attrs.clone())
    table.codes[1], table.attrs[1] = table.codes[0], table.attrs[0]
    for item_embedding, differ in [(False, False), (True, True)]:
        model = tiny(layout, item_embedding=item_embedding)
        stepper = BackboneStepper(model)
        a, _ = stepper.begin(batch_for(table, [[0, 2]], [3])._replace(target_codes=None))
        b, _ = stepper.begin(batch_for(table, [[1, 2]], [3])._replace(target_codes=None))
        assert bool((a - b).abs().max() > 1e-4) == differ


def test_the_architecture_round_trips_and_old_configs_load():
    model, table = tiny(item_embedding=True), catalog()
    arch = model.architecture()
    assert arch["n_items"] == 25 and arch["model"]["item_embedding"] is True
    again = Seq2Seq.from_architecture(arch).eval()
    again.load_state_dict(model.state_dict())
    batch = batch_for(table, [[1, 2], [4]], [3, 3])
    torch.testing.assert_close(again(batch), model(batch), atol=0, rtol=0)
    # A backbone saved before the field: no n_items, no item_embedding in its model config.
    old = tiny()
    arch = old.architecture()
    del arch["n_items"], arch["model"]["item_embedding"]
    loaded = Seq2Seq.from_architecture(arch).eval()
    loaded.load_state_dict(old.state_dict())  # strict: the same parameters, no item table
    assert loaded.enc_items is None and loaded.n_items == 0


def test_an_item_embedding_needs_the_item_count_and_the_batch_its_items():
    with pytest.raises(ValueError, match="item_embedding needs the item count"):
        tiny(item_embedding=True, n_items=0)
    model, table = tiny(item_embedding=True), catalog()
    with pytest.raises(ValueError, match="no history_items"):
        model.encode(batch_for(table, [[1, 2]], [3])._replace(history_items=None))


@pytest.mark.parametrize("layout", ["item", "code"])
def test_the_dense_head_scores_the_catalog_from_the_bos_state(layout):
    model, table = tiny(layout, dense_head=True), catalog()
    with torch.no_grad():  # random head weights, so the check is not trivially all zeros
        model.dense_bias.normal_()
    batch = batch_for(table, [[1, 2], [4, 5, 6], [7]], [3, 3, 0])
    logits, dense = model(batch, dense=True)
    assert dense.shape == (3, 25) and model.n_items == 25
    for a, b in zip(logits, model(batch)):  # the level logits are the plain forward's
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # The beam's first step reads the same BOS state the teacher-forced pass scores the catalog from.
    torch.testing.assert_close(model.dense_log_probs(batch._replace(target_codes=None)),
                               torch.log_softmax(dense, -1), atol=1e-5, rtol=0)
    # Another history, another distribution over the catalog.
    other = model.dense_log_probs(batch_for(table, [[9, 8], [4, 5, 6], [7]], [3, 3, 0]))
    assert (other[0] - torch.log_softmax(dense, -1)[0]).abs().max() > 1e-4
    # The architecture round-trips with the head and its item count.
    again = Seq2Seq.from_architecture(model.architecture()).eval()
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.dense_log_probs(batch), model.dense_log_probs(batch), atol=0, rtol=0)


def test_a_dense_head_needs_the_item_count_and_a_plain_backbone_has_none():
    with pytest.raises(ValueError, match="dense_head needs the item count"):
        tiny(dense_head=True, n_items=0)
    model, table = tiny(), catalog()
    assert model.dense_items is None
    with pytest.raises(ValueError, match="no dense head"):
        model.dense_log_probs(batch_for(table, [[1, 2]], [3]))


def test_value_experts_add_up_in_the_beam():
    # Two experts with the same scores at weights a and b prune as one at a + b; an expert at weight
    # 0 is no expert.
    model, table = tiny(dense_head=True), catalog()
    trie = PrefixTrie.from_ids(table.codes.numpy(), LEVELS)
    inst = make_instances(range(4), [[1, 2], [4, 5, 6], [7], [3, 9]], [3, 3, 0, 1], max_len=6)
    gen = torch.Generator().manual_seed(5)
    fixed = torch.log_softmax(torch.randn(4, 25, generator=gen), -1)
    other = lambda part: fixed[part.user]  # noqa: E731
    dense = dense_item_logp(model, table)

    def ranked(**kw):
        return rank_with_backbone(model, inst, table, trie, 8, batch_size=3, exclude_history=True, **kw)

    one = ranked(item_logp=dense, cf_weight=3.0)
    two = ranked(item_logp=dense, cf_weight=1.0, experts=[(dense, 2.0)])
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_allclose(one[1], two[1], atol=1e-5)
    zero = ranked(item_logp=dense, cf_weight=3.0, experts=[(other, 0.0)])
    np.testing.assert_array_equal(one[0], zero[0])
    mixed = ranked(item_logp=dense, cf_weight=3.0, experts=[(other, 4.0)])
    assert not np.array_equal(one[0], mixed[0])


def test_loss_is_sum_of_level_cross_entropies():
    # Uniform logits: each level's CE is log(V_l); the sum is log 4 + log 3 + log 5 = log 60.
    logits = [torch.zeros(2, v) for v in LEVELS]
    target = torch.tensor([[0, 1, 2], [3, 0, 4]])
    assert sequence_loss(logits, target).item() == pytest.approx(np.log(60), abs=1e-6)


def test_history_change_changes_the_prediction():
    model, table = tiny(), catalog()
    stepper = BackboneStepper(model)
    a, _ = stepper.begin(batch_for(table, [[1, 2]], [3])._replace(target_codes=None))
    b, _ = stepper.begin(batch_for(table, [[7, 2]], [3])._replace(target_codes=None))
    assert (a - b).abs().max() > 1e-4


def test_flop_count_by_hand():
    cfg = ModelConfig(d_model=2, d_ff=4, n_heads=1, encoder_layers=1, decoder_layers=1, dropout=0.0,
                      layout="item", max_history=3)
    # enc: 3 positions * (4*4 + 2*2*4 + 2*3*2) = 3 * 44 = 132
    # dec: 2 levels * (6*4 + 2*2*4 + 2*2*2 + 2*3*2) + 3*2*4 = 2 * 60 + 24 = 144 ; heads 2*(5+7) = 24
    assert count_flops_per_sample(cfg, [5, 7], history=3) == 2 * (132 + 144 + 24)


def test_ranking_in_batches_of_alike_lengths_keeps_each_users_row():
    # rank_with_backbone batches users shortest history first; rows come back in the input order,
    # each what that user alone gets.
    model, table = tiny(), catalog()
    trie = PrefixTrie.from_ids(table.codes.numpy(), LEVELS)
    histories = [[1, 2, 3, 4, 5], [6], [7, 8], [9, 10, 11, 12, 13, 14], [15]]
    inst = make_instances(range(5), histories, [0] * 5, max_len=6)
    assert by_history_length(inst).tolist() == [1, 4, 2, 0, 3]
    items, scores = rank_with_backbone(model, inst, table, trie, 8, batch_size=2, exclude_history=True)
    for u in range(5):
        alone_items, alone_scores = rank_with_backbone(model, inst.select(torch.tensor([u])), table, trie, 8,
                                                       batch_size=1, exclude_history=True)
        assert items[u].tolist() == alone_items[0].tolist()
        np.testing.assert_allclose(scores[u], alone_scores[0], atol=1e-5, rtol=0)
        assert not set(items[u].tolist()) & set(histories[u])


def tiny_sasrec(n_items=25, max_len=6, seed=3):
    from grc_core.config import SASRecConfig
    from grc_core.sasrec import SASRec

    torch.manual_seed(seed)
    cfg = SASRecConfig(hidden=8, layers=1, heads=2, dropout=0.5, max_len=max_len, lr=1e-3, weight_decay=0.0,
                       epochs=1, batch_size=4, seed=seed, device="cpu", patience=1, repeat_bias=True)
    return SASRec(n_items, cfg)


def tiny_cf(layout="item", seed=0, sasrec=None):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, d_ff=32, n_heads=2, encoder_layers=1, decoder_layers=2, dropout=0.0,
                      layout=layout, max_history=6, cf_token=True)
    return Seq2Seq(cfg, LEVELS, attr_sizes=[3], n_items=25, cf=sasrec or tiny_sasrec()).eval()


def test_the_user_state_token_is_sasrecs_own_state_after_the_history():
    from grc_core.sasrec import encode_histories

    sasrec = tiny_sasrec()
    model, table = tiny_cf(sasrec=sasrec), catalog()
    histories = [[1, 2], [4, 5, 6, 7, 8, 9], [0]]
    got = model.cf_state(batch_for(table, histories, [3, 3, 3]))
    want = sasrec.eval()(encode_histories(histories, 6, 25))[:, -1]  # what score_all scores with
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["item", "code"])
def test_the_user_state_token_tells_apart_histories_with_the_same_codes(layout):
    # Items 0 and 1 share their codes and attributes: only SASRec's state tells the histories apart.
    table = catalog()
    table = ItemTable(table.codes.clone(), table.attrs.clone())
    table.codes[1], table.attrs[1] = table.codes[0], table.attrs[0]
    for model, differ in [(tiny(layout), False), (tiny_cf(layout), True)]:
        stepper = BackboneStepper(model)
        a, _ = stepper.begin(batch_for(table, [[0, 2]], [3])._replace(target_codes=None))
        b, _ = stepper.begin(batch_for(table, [[1, 2]], [3])._replace(target_codes=None))
        gap = float((a - b).abs().max())  # small at initialisation (weights of std 0.02), but not 0
        assert (gap > 1e-6) if differ else gap == 0.0
    # Padding still changes nothing: the same history alone and beside a longer one.
    model = tiny_cf(layout)
    stepper = BackboneStepper(model)
    a, _ = stepper.begin(batch_for(table, [[1, 2]], [3])._replace(target_codes=None))
    b, _ = stepper.begin(batch_for(table, [[1, 2], [4, 5, 6, 7, 8, 9]], [3, 3])._replace(target_codes=None))
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)


def test_the_sasrec_inside_stays_frozen_and_out_of_training_mode():
    model, table = tiny_cf(), catalog()
    before = {k: v.clone() for k, v in model.cf.state_dict().items()}
    proj = model.cf_proj.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model.train()
    assert model.training and not model.cf.training  # its dropout (0.5 here) stays off
    batch = batch_for(table, [[1, 2], [4, 5, 6]], [3, 7])
    sequence_loss(model(batch), batch.target_codes).backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.cf.state_dict().items())
    assert not torch.equal(proj, model.cf_proj.weight)  # the projection learns


def test_a_user_state_backbone_round_trips_through_its_architecture():
    model, table = tiny_cf(), catalog()
    arch = model.architecture()
    assert arch["model"]["cf_token"] is True and arch["cf_sasrec"]["n_items"] == 25
    assert arch["cf_sasrec"]["config"]["hidden"] == 8
    again = Seq2Seq.from_architecture(arch).eval()
    again.load_state_dict(model.state_dict())  # strict: the SASRec's weights travel with the backbone's
    batch = batch_for(table, [[1, 2], [4]], [3, 3])
    torch.testing.assert_close(again(batch), model(batch), atol=0, rtol=0)
    assert "cf_sasrec" not in tiny().architecture()
    with pytest.raises(ValueError, match="cf_token needs the SASRec"):
        Seq2Seq(model.cfg, LEVELS, attr_sizes=[3], n_items=25)
    with pytest.raises(ValueError, match="no history_items"):
        model.encode(batch._replace(history_items=None))
