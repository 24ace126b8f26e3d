"""benchmarks.trie_layout end to end on 3,000 items and 16 users (a few seconds)."""

from __future__ import annotations

import json

import pytest

from benchmarks.trie_layout import main

pytestmark = pytest.mark.slow


def test_dense_and_csr_tries_rank_alike(tmp_path) -> None:
    out = tmp_path / "trie.json"
    main(["--items", "3000", "--users", "16", "--beams", "5", "30", "--threads", "1", "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["identical_rankings"] is True
    tries = got["tries"]
    assert set(tries["dense"]["layouts"]) == {"dense"} and set(tries["csr"]["layouts"]) == {"csr"}
    assert tries["default"]["layouts"] == tries["dense"]["layouts"]  # 3,000 items fit the dense limit
    # csr holds 16 bytes per edge, one edge per node of the next level (per item at the last level).
    nodes = tries["csr"]["nodes"]
    assert abs(tries["csr"]["nbytes_mib"] - 16 * sum(nodes[1:]) / 2**20) <= 0.05
    assert tries["csr"]["nbytes_mib"] < tries["dense"]["nbytes_mib"]
    assert all(r["users_per_s"] > 0 for t in tries.values() for r in t["decode"].values())
