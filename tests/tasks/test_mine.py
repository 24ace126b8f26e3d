import numpy as np
import polars as pl
import pytest
import torch

from grc_core.data import make_instances
from grc_core.trie import PrefixTrie
from tasks.mine import choose_candidates, label_distribution, mine_split, total_variation
from tasks.sft import MinedDrafts
from tests.grc_core.test_model import LEVELS, catalog, tiny


def test_choose_candidates_keeps_the_top_and_samples_distinct_valid_deeper_beams():
    keys = np.random.default_rng(1).random((500, 20))
    valid = np.ones((500, 20), dtype=bool)
    valid[:250, 15:] = False  # half the beams are short
    picks = choose_candidates(valid, top=3, sampled=4, keys=keys)
    assert picks.shape == (500, 7)
    assert (picks[:, :3] == [0, 1, 2]).all()
    deep = picks[:, 3:]
    assert deep.min() >= 3 and deep.max() <= 19
    assert deep[:250].max() <= 14  # never a padding slot
    assert all(len(set(row)) == 4 for row in deep.tolist())
    assert len(np.unique(deep[250:])) == 17  # every deeper rank gets drawn somewhere
    # a row's choice depends on its own keys only (not on the batch it is in)
    assert np.array_equal(picks[260:270], choose_candidates(valid[260:270], 3, 4, keys[260:270]))
    other = choose_candidates(valid, 3, 4, np.random.default_rng(2).random((500, 20)))
    assert not np.array_equal(picks, other)
    with pytest.raises(ValueError, match="top \\+ sampled"):
        choose_candidates(valid[:5, :4], top=3, sampled=2, keys=keys[:5, :4])
    with pytest.raises(ValueError, match="raise mine.beam"):
        choose_candidates(valid[:5, :16] & (np.arange(16) < 5), top=3, sampled=4, keys=keys[:5, :16])


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


def test_user_folds_are_a_fixed_balanced_function_of_the_user_id():
    from grc_core.data import user_folds

    users = np.arange(20_000)
    folds = user_folds(users, 2, seed=7)
    assert set(np.unique(folds)) == {0, 1}
    assert abs(np.bincount(folds)[0] - 10_000) < 400  # balanced up to hash noise (sd ~70)
    # the same user gets the same fold in any subset or order (train, valid and chosen subsets agree)
    perm = np.random.default_rng(0).permutation(users)[:5000]
    assert np.array_equal(user_folds(perm, 2, seed=7), folds[perm])
    assert not np.array_equal(user_folds(users, 2, seed=8), folds)  # the seed matters
    assert np.bincount(user_folds(users, 5, seed=7)).min() > 3700


def test_include_target_replaces_the_last_draft_of_instances_that_miss_it():
    import polars as pl

    from tasks.mine import include_target

    codes = np.array([[0, 1], [0, 2], [1, 0], [1, 1]])  # (N=4, L=2)
    frame = pl.DataFrame({
        "instance": [0, 0, 0, 1, 1, 1], "target": [3, 3, 3, 1, 1, 1], "cand": [0, 1, 2, 0, 1, 2],
        "beam_rank": [0, 1, 7, 0, 1, 4], "item": [0, 2, 1, 1, 0, 2], "score": [-1.0, -2.0, -3.0, -1.0, -2.0, -3.0],
        "r_loc": [1, 2, 1, 3, 2, 1], "r_sem_brand": [0, 1, 0, 1, 1, 0],
        "codes": [[0, 1], [1, 0], [0, 2], [0, 2], [0, 1], [1, 0]],
    }, schema_overrides={"r_loc": pl.Int32, "cand": pl.Int32, "score": pl.Float32, "codes": pl.List(pl.Int64)})
    out = include_target(frame, codes, ("brand",))
    # instance 0 misses item 3: its last draft (cand 2, item 1) becomes item 3, r_loc L+1 = 3, r_sem 1
    assert out["item"].to_list() == [0, 2, 3, 1, 0, 2]
    assert out["r_loc"].to_list() == [1, 2, 3, 3, 2, 1]
    assert out["r_sem_brand"].to_list() == [0, 1, 1, 1, 1, 0]
    assert out["beam_rank"].to_list() == [0, 1, -1, 0, 1, 4]
    assert out["codes"].to_list()[2] == [1, 1]
    assert np.isnan(out["score"][2]) and out["score"][0] == -1.0
    # instance 1 already holds its target (cand 0): unchanged
    assert out.filter(pl.col("instance") == 1).equals(frame.filter(pl.col("instance") == 1))
    assert out.schema == frame.schema
