import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from grc_core.sasrec import (
    SASRec,
    SASRecConfig,
    SeqRows,
    encode_histories,
    evaluate,
    score_all,
    sequence_windows,
    topk_items,
    train_sasrec,
    training_sequences,
    visible_prefixes,
)

BASE = dict(hidden=64, layers=2, heads=1, dropout=0.2, max_len=20, lr=1e-3, weight_decay=0.1, epochs=200,
            batch_size=128, seed=0, device="cpu", patience=6, repeat_bias=True)


def sasrec_cfg(**changes) -> SASRecConfig:
    return SASRecConfig(**{**BASE, **changes})


TINY = sasrec_cfg(hidden=16, layers=2, heads=2, dropout=0.0, max_len=6, epochs=1, batch_size=8)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops on a shared machine: a second OpenMP thread only adds waiting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def split_rows(seqs: list[list[int]], max_len: int = 20) -> tuple[SeqRows, SeqRows, SeqRows]:
    """Leave-one-out rows as in splits/*.parquet: train targets at 1..n-3, valid n-2, test n-1."""
    train: list[tuple[int, int, list[int], int]] = []
    valid, test = [], []
    for user, s in enumerate(seqs):
        n = len(s)
        for p in range(1, n - 2):
            train.append((user, p, s[max(0, p - max_len):p], s[p]))
        valid.append((user, n - 2, s[max(0, n - 2 - max_len):n - 2], s[n - 2]))
        test.append((user, n - 1, s[max(0, n - 1 - max_len):n - 1], s[n - 1]))

    def rows(r: list) -> SeqRows:
        return SeqRows([h for _, _, h, _ in r], np.array([t for *_, t in r]),
                       np.array([u for u, *_ in r]), np.array([p for _, p, *_ in r]))

    return rows(train), rows(valid), rows(test)


def successor_sequences(n_items: int, n_users: int, length: int, seed: int) -> list[list[int]]:
    """Item i is always followed by item (i + 1) mod N, from a random start."""
    starts = np.random.default_rng(seed).integers(0, n_items, n_users)
    return [[int((s + j) % n_items) for j in range(length)] for s in starts]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        sasrec_cfg(hidden=10, heads=3)
    with pytest.raises(ValueError, match="dropout"):
        sasrec_cfg(dropout=1.0)
    with pytest.raises(ValueError, match="threads"):
        sasrec_cfg(threads=-1)


def test_training_runs_on_its_threads_and_gives_the_process_its_own_back():
    """The weights depend on the float order, so the config fixes the thread count of training
    (params.yaml sasrec.threads) whatever the environment's OMP_NUM_THREADS; afterwards the
    process's own count is back."""
    train, valid, _ = split_rows(successor_sequences(20, 40, 6, seed=1))
    seen = []
    torch.set_num_threads(2)  # the autouse fixture restores the suite's count
    train_sasrec(train, valid, 20, replace(TINY, threads=1, epochs=2), lambda e, r: seen.append(torch.get_num_threads()))
    assert seen == [1, 1] and torch.get_num_threads() == 2
    train_sasrec(train, valid, 20, replace(TINY, threads=0), lambda e, r: seen.append(torch.get_num_threads()))
    assert seen[-1] == 2  # 0 leaves the process's count


def test_training_sequences_rebuilds_users_from_shuffled_rows():
    # User 7: [4, 5, 6, 2, 9] -> train targets at positions 1, 2 are 5, 6; user 3: [1, 0, 8, 8] -> target 0.
    rows = SeqRows([[4, 5], [1], [4]], np.array([6, 0, 5]), np.array([7, 3, 7]), np.array([2, 1, 1]))
    assert training_sequences(rows) == [[1, 0], [4, 5, 6]]  # users in id order
    gap = SeqRows([[4], [4, 5, 6]], np.array([5, 2]), np.array([7, 7]), np.array([1, 3]))
    with pytest.raises(ValueError, match="user 7"):
        training_sequences(gap)
    with pytest.raises(ValueError, match="need users"):
        training_sequences(SeqRows([[4]], np.array([5])))


def test_sequence_windows_label_every_item_after_the_first_once():
    # [10..15] with max_len 3 -> from the end: inputs 12,13,14 -> labels 13,14,15;
    # then the window ends at 12: inputs pad,10,11 -> labels -,11,12. Inputs are shifted by +1.
    w = sequence_windows([[10, 11, 12, 13, 14, 15], [7]], max_len=3)
    assert w.inputs.tolist() == [[13, 14, 15], [0, 11, 12]]
    assert w.labels.tolist() == [[13, 14, 15], [-100, 11, 12]]


def test_encode_histories_left_pads_truncates_and_shifts():
    out = encode_histories([[3], [0, 1, 2, 3, 4]], max_len=3, n_items=5)
    assert out.tolist() == [[0, 0, 4], [3, 4, 5]]  # the last 3 items, +1; 0 = pad
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        encode_histories([[5]], max_len=3, n_items=5)


def test_shapes_and_topk_agree_with_scores():
    torch.manual_seed(0)
    model = SASRec(n_items=11, cfg=TINY).eval()
    seqs = encode_histories([[1, 2], [3, 4, 5, 6]], TINY.max_len, 11)  # (2, 4)
    assert model(seqs).shape == (2, 4, 16)
    histories = [[1, 2], [3, 4, 5, 6], [10]]
    scores = score_all(model, histories)
    assert scores.shape == (3, 11) and scores.dtype == np.float32
    top = topk_items(model, histories, 4)
    assert top.shape == (3, 4)
    np.testing.assert_array_equal(top, np.argsort(-scores, axis=1, kind="stable")[:, :4])
    banned = topk_items(model, histories, 11, exclude=[[top[0, 0]], [], list(range(5))])
    assert banned[0, -1] == top[0, 0]  # excluded items sink to the bottom
    assert set(banned[2, -5:]) == set(range(5))


def test_causal_mask_later_items_do_not_change_earlier_states():
    torch.manual_seed(0)
    model = SASRec(n_items=11, cfg=TINY).eval()
    a = torch.tensor([[0, 2, 3, 4, 5, 6]])
    b = torch.tensor([[0, 2, 3, 4, 9, 1]])  # differs from position 4 on
    with torch.no_grad():
        sa, sb = model(a), model(b)
    assert (sa[:, :4] - sb[:, :4]).abs().max() <= 1e-6
    assert not torch.allclose(sa[:, 4:], sb[:, 4:])


def test_more_left_padding_changes_nothing():
    torch.manual_seed(0)
    model = SASRec(n_items=11, cfg=TINY).eval()
    short = torch.tensor([[0, 3, 7, 2]])
    long = torch.tensor([[0, 0, 0, 3, 7, 2]])
    with torch.no_grad():
        assert (model(short)[:, -3:] - model(long)[:, -3:]).abs().max() <= 1e-6
    # The same history scored alone and beside a longer one (which pads it more).
    alone = score_all(model, [[2, 6, 1]])
    beside = score_all(model, [[2, 6, 1], [0, 1, 2, 3, 4]])[:1]
    np.testing.assert_allclose(alone, beside, rtol=0, atol=1e-5)


def test_repeat_bias_shifts_history_items_only():
    torch.manual_seed(0)
    model = SASRec(n_items=11, cfg=TINY).eval()
    plain = SASRec(n_items=11, cfg=sasrec_cfg(**{**TINY.__dict__, "repeat_bias": False})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "repeat_bias"})
    with torch.no_grad():
        model.repeat_bias.fill_(-0.3)
    # History [4, 7, 4]: items 4 and 7 move by 10 * -0.3 = -3 (4 once, though it occurs twice).
    assert model.repeat_offset() == pytest.approx(-3.0) and plain.repeat_offset() is None
    diff = score_all(model, [[4, 7, 4]]) - score_all(plain, [[4, 7, 4]])
    expected = np.zeros((1, 11), np.float32)
    expected[0, [4, 7]] = -3.0
    np.testing.assert_allclose(diff, expected, rtol=0, atol=1e-5)


def test_training_scores_match_inference_scores_at_every_position():
    # The loss scores position t from the prefix s_1..s_t; score_all of that prefix must agree.
    torch.manual_seed(0)
    model = SASRec(n_items=11, cfg=TINY).eval()
    with torch.no_grad():
        model.repeat_bias.fill_(0.2)
    history = [3, 9, 3, 5]
    seqs = encode_histories([history], TINY.max_len, 11)  # (1, 4)
    with torch.no_grad():
        train_path = model.item_scores(model(seqs)[0], visible_prefixes(seqs)[0]).numpy()  # (4, N)
    infer_path = score_all(model, [history[:t + 1] for t in range(len(history))])  # (4, N)
    np.testing.assert_allclose(train_path, infer_path, rtol=0, atol=1e-5)


def test_learns_the_successor_rule():
    # 100 items, item i always followed by i + 1 (mod 100): Recall@1 on held-out targets must be near 1.
    train, valid, test = split_rows(successor_sequences(100, 300, 8, seed=0))
    cfg = sasrec_cfg(hidden=32, layers=1, heads=1, dropout=0.0, max_len=8, lr=1e-2, epochs=10,
                       batch_size=64, patience=10)
    model, history = train_sasrec(train, valid, 100, cfg)
    assert history[-1]["loss"] < history[0]["loss"]
    assert evaluate(model, test, ks=(1,))["recall@1"] > 0.9


def test_same_seed_same_model_other_seed_differs():
    train, valid, _ = split_rows(successor_sequences(20, 40, 6, seed=1))
    cfg = sasrec_cfg(hidden=16, layers=1, heads=2, dropout=0.3, max_len=6, epochs=2, batch_size=16, seed=3)
    m1, h1 = train_sasrec(train, valid, 20, cfg)
    m2, h2 = train_sasrec(train, valid, 20, cfg)
    m3, _ = train_sasrec(train, valid, 20, sasrec_cfg(**{**cfg.__dict__, "seed": 4}))
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert not torch.equal(m1.item_emb.weight, m3.item_emb.weight)


def test_early_stopping_keeps_the_best_epoch():
    train, valid, _ = split_rows(successor_sequences(20, 40, 6, seed=2))
    cfg = sasrec_cfg(hidden=16, layers=1, heads=1, dropout=0.0, max_len=6, lr=1e-2, epochs=30,
                       batch_size=16, patience=2)
    model, history = train_sasrec(train, valid, 20, cfg)
    best = max(history, key=lambda r: (r["valid_recall@10"], r["valid_ndcg@10"]))
    assert len(history) == min(30, best["epoch"] + 1 + 2)  # stops `patience` epochs after the best
    assert evaluate(model, valid)["recall@10"] == pytest.approx(best["valid_recall@10"], abs=1e-12)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    from tasks.checkpoints import Checkpointer

    train, valid, _ = split_rows(successor_sequences(20, 40, 6, seed=1))
    cfg = sasrec_cfg(hidden=16, layers=1, heads=2, dropout=0.3, max_len=6, epochs=4, batch_size=16, seed=3)
    straight, h_straight = train_sasrec(train, valid, 20, cfg)  # no checkpoints

    class Killed(Exception):
        pass

    def kill_in_epoch_2(epoch, record):
        if epoch == 1:
            raise Killed  # progress runs before that epoch's save: only epoch 1's checkpoint exists

    with pytest.raises(Killed):
        train_sasrec(train, valid, 20, cfg, kill_in_epoch_2, Checkpointer(tmp_path, "fp"))
    assert json.loads((tmp_path / "last" / "trainer.json").read_text())["epoch"] == 1
    resumed, h_resumed = train_sasrec(train, valid, 20, cfg, None, Checkpointer(tmp_path, "fp"))
    assert [r["loss"] for r in h_resumed] == [r["loss"] for r in h_straight]  # dropout and shuffles replayed
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    again = []
    train_sasrec(train, valid, 20, cfg, lambda e, r: again.append(e), Checkpointer(tmp_path, "fp"))
    assert again == []  # finished: a rerun trains nothing
    train_sasrec(train, valid, 20, cfg, lambda e, r: again.append(e), Checkpointer(tmp_path, "another fingerprint"))
    assert again == [0, 1, 2, 3]  # another fingerprint: every epoch again


def test_an_ensembles_distribution_by_hand():
    from grc_core.sasrec import fuse_log_probs

    a = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    b = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]))
    # w 2, first row: 0.4*0.01, 0.3*0.04, 0.2*0.09, 0.1*0.16 = 0.004, 0.012, 0.018, 0.016 (sum 0.05)
    got = fuse_log_probs(a, [b], 2.0).exp()
    assert torch.allclose(got[0], torch.tensor([0.08, 0.24, 0.36, 0.32]), atol=1e-6)
    assert torch.allclose(got[1], torch.tensor([0.49, 0.01, 0.01, 0.01]) / 0.52, atol=1e-6)
    # two members enter by their mean log-probability: (p_b p_c)^(w/2); with c = b that is p_b^w again
    assert torch.allclose(fuse_log_probs(a, [b, b], 2.0), fuse_log_probs(a, [b], 2.0), atol=1e-6)
    c = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.1, 0.1, 0.7]]))
    by_hand = torch.log_softmax(a + 2.0 * (b + c) / 2, -1)
    assert torch.allclose(fuse_log_probs(a, [b, c], 2.0), by_hand, atol=1e-6)
    # a uniform member leaves the first's distribution as it is; no members or w 0: the first, untouched
    flat = torch.full((2, 4), math.log(0.25))
    assert torch.allclose(fuse_log_probs(a, [flat], 3.0), a, atol=1e-6)
    assert fuse_log_probs(a, [], 2.0) is a and fuse_log_probs(a, [b], 0.0) is a
    # excluded items (-inf in every model) stay -inf and take no mass
    ex = a.clone()
    ex[0, 1] = float("-inf")
    got = fuse_log_probs(ex, [b.masked_fill(torch.isneginf(ex), float("-inf"))], 1.0)
    assert torch.isneginf(got[0, 1]) and torch.allclose(got[0].exp().sum(), torch.tensor(1.0))


def test_top_by_log_probs_ties_go_to_the_smaller_id_and_excluded_items_are_padding():
    from grc_core.sasrec import top_by_log_probs

    logp = torch.tensor([[-1.0, -0.5, -1.0, float("-inf")], [float("-inf")] * 2 + [-2.0, -3.0]])
    items, scores = top_by_log_probs(logp, 4)
    assert items.tolist() == [[1, 0, 2, -1], [2, 3, -1, -1]]
    assert scores[0, :3].tolist() == [-0.5, -1.0, -1.0] and np.isneginf(scores[0, 3])
