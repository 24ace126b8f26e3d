"""benchmarks.cf_distill: its decode cache reuses a decode only for the same users and backbone."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import benchmarks.cf_distill as cd


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """A run folder whose backbone file is real (its digest keys the cache) and a decoder that counts calls."""
    run = tmp_path / "run" / "data"
    (run / "toy" / "backbone").mkdir(parents=True)
    weights = run / "toy" / "backbone" / "model.safetensors"
    weights.write_bytes(b"weights v1")
    state = {"targets": np.array([3, 1, 2]), "calls": []}
    monkeypatch.setattr(cd, "load_split", lambda *a: None)
    monkeypatch.setattr(cd, "subset", lambda *a: SimpleNamespace(target=torch.as_tensor(state["targets"])))
    monkeypatch.setattr(cd, "item_index", lambda *a: (SimpleNamespace(codes=torch.zeros(4, 2)), None, None, None))
    monkeypatch.setattr(cd, "load_backbone", lambda d: None)
    monkeypatch.setattr(cd, "load_baseline", lambda d: None)
    monkeypatch.setattr(cd, "sasrec_log_probs", lambda m: None)
    monkeypatch.setattr(cd, "backbone_cf_mode", lambda d: "shallow")

    def rank(*a, cf_weight=0.0, **k):
        state["calls"].append(cf_weight)
        return np.tile(np.arange(4), (len(state["targets"]), 1)) + int(cf_weight), None
    monkeypatch.setattr(cd, "rank_with_backbone", rank)
    params = SimpleNamespace(data=SimpleNamespace(dataset="toy", max_history=5, exclude_history=True),
                             evaluate=SimpleNamespace(users_seed=0), dataset=SimpleNamespace(attributes=[]))
    return params, run, weights, state


def test_cached_decodes_are_reused_and_checked(fake_run, tmp_path):
    params, run, weights, state = fake_run
    cache = tmp_path / "cache"
    first = cd.decode(params, run, "valid", 3, [2.0], 10, 8, cache, "0")
    assert state["calls"] == [0.0, 2.0]
    assert sorted(p.name for p in cache.iterdir()) == ["0_valid_3_10_w0.npz", "0_valid_3_10_w2.npz"]
    again = cd.decode(params, run, "valid", 3, [2.0, 4.0], 10, 8, cache, "0")
    assert state["calls"] == [0.0, 2.0, 4.0]  # only the new weight is decoded
    for w in (0.0, 2.0):
        assert np.array_equal(again[w], first[w])
    weights.write_bytes(b"weights v2")  # a retrained backbone: its old decodes are not read
    with pytest.raises(ValueError, match="another backbone"):
        cd.decode(params, run, "valid", 3, [2.0], 10, 8, cache, "0")
    weights.write_bytes(b"weights v1")
    state["targets"] = np.array([3, 1, 0])  # other users under the same count
    with pytest.raises(ValueError, match="other users"):
        cd.decode(params, run, "valid", 3, [2.0], 10, 8, cache, "0")


def test_no_cache_decodes_every_time(fake_run):
    params, run, _, state = fake_run
    cd.decode(params, run, "test", 3, [1.0], 10, 8)
    cd.decode(params, run, "test", 3, [1.0], 10, 8)
    assert state["calls"] == [0.0, 1.0, 0.0, 1.0]
