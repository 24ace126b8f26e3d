"""The shared real datasets ingest to their published counts and give unique IDs.

Skipped where ../shared/datasets is absent (a user's machine); CI has it.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from tasks.env import PROJECT_ROOT
from tasks.ingest import build_splits, read_source, with_buckets
from tasks.params import load_params
from tasks.tokenize import tokenize_items

SHARED = PROJECT_ROOT.parent / "shared" / "datasets"
pytestmark = [pytest.mark.shared_data,
              pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} not found (shared datasets absent)")]


@pytest.mark.parametrize("name, users, items, interactions", [
    ("scientific", 8_317, 4_344, 58_492),
    ("instruments", 24_772, 9_922, 206_153),
])
def test_published_counts(name, users, items, interactions):
    params = load_params(None, [f"data.dataset={name}", f"datasets.{name}.path={json.dumps(str(SHARED / name))}"])
    raw = read_source.fn(params.dataset)
    assert raw.interactions["user_id"].n_unique() == users
    assert raw.items.height == items
    assert raw.interactions.height == interactions
    splits = build_splits(raw.interactions, params.data.max_history)
    assert splits["test"].height == splits["valid"].height == users
    # every interaction but each user's first, validation and test item is a training target
    assert splits["train"].height == interactions - 3 * users


def test_instruments_prebuilt_ids_are_unique_after_disambiguation():
    params = load_params(None, ["data.dataset=instruments", f"datasets.instruments.path={json.dumps(str(SHARED / 'instruments'))}"])
    items = with_buckets(read_source.fn(params.dataset).items)
    tok = tokenize_items.fn(items, np.zeros((0, 0), np.float32), params.tokenize, params.id_source)
    assert tok.ids.shape == (9_922, 5)  # 4 levels + a disambiguation level
    assert len(np.unique(tok.ids, axis=0)) == 9_922
    assert tok.extra_level_size == 3  # README: at most 3 items on one code
    # 48 items sit on 23 shared codes (21 pairs + 2 triples): 48 - 23 = 25 surplus items
    assert tok.metrics["collision_rate_before"] == pytest.approx(48 / 9_922)
    group_sizes = pl.DataFrame({"k": ["-".join(map(str, r)) for r in tok.base_codes.tolist()]}).group_by("k").len()
    assert int((group_sizes["len"] - 1).sum()) == 25  # 9,922 items on 9,897 distinct codes
