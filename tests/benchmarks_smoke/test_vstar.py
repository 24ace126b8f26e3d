"""benchmarks.vstar ranks a policy once when RL kept the backbone's weights."""

from __future__ import annotations

import torch

from benchmarks.vstar import parse_source, same_weights


def test_same_weights_tells_a_copy_from_a_changed_model():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    assert not same_weights(a, b)  # another initialisation
    b.load_state_dict(a.state_dict())
    assert same_weights(a, b)
    with torch.no_grad():
        b[1].bias[2] += 1e-6  # one value in one tensor
    assert not same_weights(a, b)
    assert not same_weights(a, torch.nn.Sequential(torch.nn.Linear(4, 3)))  # other parameters


def test_parse_source_reads_the_sum_weight():
    assert parse_source("learned") == ("learned", 0.0)
    assert parse_source("sum:0.5") == ("sum", 0.5)
