"""DDP: two real gloo processes train the backbone loop; the result must match one process.

Tolerance: the two runs differ only in float summation order (each rank sums its half of the
batch, DDP averages the halves; the uneven last batch is weighted so the mean is exact), so
after 3 epochs of AdamW the weights agree to about 1e-6; we allow 1e-4 absolute, far below
how far training moves them (more than 1e-2 here).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from grc_core.data import make_instances, to_batch
from grc_core.model import sequence_loss
from grc_core.train import TrainConfig, fit
from tasks.checkpoints import Checkpointer
from tests.grc_core.test_model import catalog, tiny

CFG = TrainConfig(epochs=3, batch_size=8, lr=0.01, weight_decay=0.01, warmup_steps=2, min_lr_ratio=0.1,
                  grad_clip=1.0, eval_every=1, patience=0, seed=5, device="cpu", threads=1)


def _data():
    gen = torch.Generator().manual_seed(3)
    # 33 = 4 x 8 + 1: the last global batch holds one instance, so rank 1 has nothing in it
    hist = torch.randint(0, 25, (33, 4), generator=gen).tolist()
    tgt = torch.randint(0, 25, (33,), generator=gen).tolist()
    return make_instances(list(range(33)), hist, tgt, max_len=6), catalog()


class Crash(RuntimeError):
    pass


def _train(ckpt: Path, cfg: TrainConfig, crash_at: int = -1) -> None:
    inst, table = _data()
    model = tiny().train()
    calls = [0]

    def loss_fn(m, idx):
        calls[0] += 1
        if calls[0] == crash_at:  # every rank dies at the same step, as a killed job would stop
            raise Crash(f"crash at step {crash_at}")
        batch = to_batch(inst.select(idx), table)
        return sequence_loss(m(batch), batch.target_codes)

    def evaluate(m):
        with torch.no_grad():
            batch = to_batch(inst, table)
            return {"recall@10": -float(sequence_loss(m(batch), batch.target_codes))}

    fit(model, len(inst), loss_fn, evaluate, cfg, Checkpointer(ckpt, ""))


def _worker(rank: int, world: int, port: int, ckpt: str, cfg: TrainConfig, crash_at: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    from grc_core import distributed

    assert distributed.init_from_env("cpu") == (rank, world)
    _train(Path(ckpt), cfg, crash_at)
    distributed.shutdown()


def _run_ddp(ckpt: Path, cfg: TrainConfig, world: int = 2, crash_at: int = -1) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, str(ckpt), cfg, crash_at), nprocs=world, join=True, start_method="spawn")


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "last" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _train(root / "single", CFG)
    _run_ddp(root / "ddp", CFG)
    return root


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(runs):
    single, ddp = _weights(runs / "single"), _weights(runs / "ddp")
    start = tiny().state_dict()
    moved = max(float((single[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-2  # training did move the weights, so agreement below is not vacuous
    assert _max_diff(single, ddp) < 1e-4
    s = json.loads((runs / "single" / "last" / "trainer.json").read_text())["state"]
    d = json.loads((runs / "ddp" / "last" / "trainer.json").read_text())["state"]
    assert s["step"] == d["step"] == 3 * 5  # ceil(33 / 8) steps per epoch on both
    assert [r["train_loss"] for r in s["history"]] == pytest.approx([r["train_loss"] for r in d["history"]], abs=1e-4)
    assert s["best_epoch"] == d["best_epoch"]


@pytest.mark.slow
def test_ddp_resumes_from_its_checkpoint_to_the_same_weights(runs, tmp_path):
    with pytest.raises(Exception, match="crash at step 8"):
        _run_ddp(tmp_path / "ckpt", CFG, crash_at=8)  # both ranks die in epoch 2 (5 steps per epoch)
    first = _weights(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "last" / "trainer.json").read_text())["state"]["epoch"] == 1
    _run_ddp(tmp_path / "ckpt", CFG)  # resumes at epoch 2 of 3
    resumed = _weights(tmp_path / "ckpt")
    assert _max_diff(first, resumed) > 1e-3
    assert _max_diff(resumed, _weights(runs / "ddp")) < 1e-6


def test_global_batch_must_divide_by_the_world_size(tmp_path):
    with pytest.raises(ValueError, match="must divide by the world size"):
        fit(tiny(), 10, lambda m, i: torch.zeros(()), lambda m: {"recall@10": 0.0}, replace(CFG, batch_size=7),
            Checkpointer(tmp_path, ""), rank=0, world=2)


@pytest.mark.slow
def test_load_weights_of_a_ddp_checkpoint_into_a_plain_model(runs):
    model = tiny()
    Checkpointer(runs / "ddp", "").load_weights("last", model)  # rank 0 saved the unwrapped state dict (no "module." prefix)
    saved = _weights(runs / "ddp")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
