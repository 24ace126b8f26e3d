import numpy as np
import torch

from benchmarks.history_trim import compare, logp_gap
from grc_core.data import ItemTable, make_instances
from grc_core.model import ModelConfig, Seq2Seq

NEG = -np.inf


def test_compare_counts_near_tie_swaps_apart_from_other_differences():
    a_items = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    a_scores = np.array([[-1.0, -2.0, -3.0], [-1.0, -1.00001, -3.0], [-1.0, -2.0, NEG]])
    b_items = np.array([[1, 2, 3], [5, 4, 6], [7, 9, 8]])  # user 1: a near-tie swap; user 2: 9 came in
    b_scores = np.array([[-1.0, -2.0, -3.0], [-1.0, -1.00001, -3.0], [-1.0, -2.5, NEG]])
    out = compare(a_items, a_scores, b_items, b_scores)
    assert out["identical_users"] == 1
    assert out["swapped_ranks"] == 3  # two in user 1, one in user 2 (rank 3 is -inf: not compared)
    assert out["unexplained"] == 1  # item 8 at -2.0 is absent from b, whose last finite score is -2.5
    assert out["same_dead_beams"] and abs(out["max_score_gap"] - 0.5) < 1e-12


def test_the_trimmed_and_full_width_batches_give_the_same_log_probs():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, d_ff=32, n_heads=2, encoder_layers=1, decoder_layers=1, dropout=0.0,
                      layout="item", max_history=6)
    model = Seq2Seq(cfg, [4, 5], []).eval()
    table = ItemTable(torch.tensor([[a, b] for a in range(4) for b in range(5)]), torch.zeros(20, 0, dtype=torch.long))
    inst = make_instances(range(4), [[1], [2, 3], [4, 5, 6, 7, 8, 9], [10]], [11, 12, 13, 14], max_len=6)
    assert logp_gap(model, inst, table, batch_size=2) < 1e-5

    def start_counted(batch):  # the encoder before 2026-12-05: positions from the left of the batch
        codes, keep = batch.history_codes, batch.history_mask
        x = sum(emb(codes[..., j]) for j, emb in enumerate(model.enc_codes))
        return x + model.enc_pos.weight[:codes.shape[1]], keep

    model.embed_history = start_counted
    assert logp_gap(model, inst, table, batch_size=2) > 1e-3  # the check fails where rows move
