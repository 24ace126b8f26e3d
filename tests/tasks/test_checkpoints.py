"""The training checkpoints (tasks/checkpoints.py) under SIGKILL: whenever a process writing them
dies after its first checkpoint, the next run resumes a whole one (weights and metadata of the
same step), never a half-written one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tasks.checkpoints import Checkpointer
from tasks.env import PROJECT_ROOT

WRITER = """
import sys, torch
from tasks.checkpoints import Checkpointer
ckpt = Checkpointer(sys.argv[1], "fp")
model = torch.nn.Linear(256, 256)
opt = torch.optim.AdamW(model.parameters())
step = 0
print("ready", flush=True)
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))  # every weight holds the step its checkpoint claims
    ckpt.save("last", model, None, {"step": step})
    if step == 1:
        print("saved", flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.07, 0.15])  # kills at different moments of later saves
def test_a_killed_save_leaves_a_whole_checkpoint_or_none(tmp_path, delay):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "ckpt")], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().strip() == "saved"  # one whole checkpoint exists; saves go on
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    model = torch.nn.Linear(256, 256)
    meta = Checkpointer(tmp_path / "ckpt", "fp").resume(model, None)
    assert meta is not None, "a whole checkpoint was written before the kill: it must resume"
    step = meta["step"]
    assert all(torch.all(p == float(step)) for p in model.parameters()), f"weights of another step than {step}"
    # the next save replaces the leftovers of the killed one
    Checkpointer(tmp_path / "ckpt", "fp").save("last", model, None, {"step": step})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last"]


def test_another_fingerprint_starts_afresh_and_says_what_it_discards(tmp_path, caplog):
    model = torch.nn.Linear(4, 4)
    Checkpointer(tmp_path / "ckpt", "fp-old").save("last", model, None, {"state": {"epoch": 6, "step": 3090}})
    assert Checkpointer(tmp_path / "ckpt", "fp-old").resume(torch.nn.Linear(4, 4), None) is not None
    with caplog.at_level("WARNING", logger="tasks.checkpoints"):
        assert Checkpointer(tmp_path / "ckpt", "fp-new").resume(torch.nn.Linear(4, 4), None) is None
    assert "epoch 6, step 3090" in caplog.text and "another fingerprint" in caplog.text
    assert not (tmp_path / "ckpt").exists()
