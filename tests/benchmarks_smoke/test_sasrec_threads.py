"""benchmarks.sasrec_threads: the digest is that of the weights file the sasrec stage writes."""

from __future__ import annotations

import hashlib

import torch

from benchmarks.sasrec_threads import weights_sha256
from grc_core.config import SASRecConfig
from grc_core.sasrec import SASRec
from tasks import io


def test_the_digest_is_the_stage_files_and_tells_weights_apart(tmp_path):
    cfg = SASRecConfig(hidden=8, layers=1, heads=1, dropout=0.0, max_len=4, lr=1e-3, weight_decay=0.0, epochs=1,
                       batch_size=4, seed=0, device="cpu", patience=1, repeat_bias=True)
    torch.manual_seed(0)
    model = SASRec(10, cfg)
    path = tmp_path / "model.safetensors"
    io.write_safetensors(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    assert weights_sha256(model) == hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        model.item_emb.weight[3, 0] += 1e-7
    assert weights_sha256(model) != hashlib.sha256(path.read_bytes()).hexdigest()
