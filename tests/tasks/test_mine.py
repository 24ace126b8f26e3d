import numpy as np
import polars as pl
import pytest
import torch

from grc_core.data import make_instances
from grc_core.trie import PrefixTrie
from tasks.mine import choose_candidates, label_distribution, mine_split, total_variation
from tasks.sft import MinedDrafts
from tests.grc_core.test_model import LEVELS, catalog, tiny


def test_choose_candidates_keeps_the_top_and_samples_distinct_deeper_beams():
    picks = choose_candidates(500, beam=20, top=3, sampled=4, seed=1)
    assert picks.shape == (500, 7)
    assert (picks[:, :3] == [0, 1, 2]).all()
    deep = picks[:, 3:]
    assert deep.min() >= 3 and deep.max() <= 19
    assert all(len(set(row)) == 4 for row in deep.tolist())
    assert len(np.unique(deep)) == 17  # every deeper rank gets drawn somewhere
    assert np.array_equal(picks, choose_candidates(500, 20, 3, 4, seed=1))
    assert not np.array_equal(picks, choose_candidates(500, 20, 3, 4, seed=2))
    with pytest.raises(ValueError, match="top \\+ sampled"):
        choose_candidates(5, beam=4, top=3, sampled=2, seed=0)


def test_mine_split_labels_match_their_definitions():
    model, table = tiny(), catalog()
    trie = PrefixTrie.from_ids(table.codes.numpy(), LEVELS)
    inst = make_instances([0, 1, 2, 3], [[0, 1], [2], [3, 4, 5], [6]], [7, 8, 9, 10], max_len=6)
    frame = mine_split(model, inst, table, trie, beam=8, top=2, sampled=3, seed=0, batch_size=3,
                       attributes=("category",), desc="test")
    assert frame.height == 4 * 5
    assert frame.group_by("instance").len()["len"].to_list() == [5] * 4
    for row in frame.iter_rows(named=True):
        codes, target = row["codes"], table.codes[row["target"]].tolist()
        diff = [t for t in range(len(LEVELS)) if codes[t] != target[t]]
        assert row["r_loc"] == (diff[0] + 1 if diff else len(LEVELS) + 1)
        assert codes == table.codes[row["item"]].tolist()
        assert row["r_sem_category"] == int(table.attrs[row["item"], 0] == table.attrs[row["target"], 0])
    # the top two candidates are the beam's best two, in order
    top = frame.filter(pl.col("cand") < 2)
    assert top["beam_rank"].to_list() == [0, 1] * 4
    dist = label_distribution(frame, len(LEVELS), ("category",))
    assert sum(dist["r_loc_share"].values()) == pytest.approx(1.0)
    assert total_variation(dist["r_loc_share"], dist["r_loc_share"]) == 0.0
    mined = MinedDrafts(frame, ("category",))
    assert mined.drafts.shape == (4, 5, len(LEVELS)) and mined.r_sem.shape == (4, 5, 1)
    assert torch.equal(mined.drafts[2, 0], torch.tensor(frame.filter(pl.col("instance") == 2)["codes"][0].to_list()))
