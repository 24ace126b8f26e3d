"""The training checkpoints (tasks/checkpoints.py) under SIGKILL: whenever a process writing them
dies, the next run resumes a whole checkpoint (weights and metadata of the same step) or none."""

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
"""


@pytest.mark.parametrize("delay", [0.05, 0.11, 0.23, 0.37, 0.61])
def test_a_killed_save_leaves_a_whole_checkpoint_or_none(tmp_path, delay):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "ckpt")], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    model = torch.nn.Linear(256, 256)
    meta = Checkpointer(tmp_path / "ckpt", "fp").resume(model, None)
    if meta is None:  # killed before the first save finished: nothing to resume, nothing half-read
        assert delay < 0.3, "a save of 256 KiB takes milliseconds: by now some checkpoint must be whole"
        assert not (tmp_path / "ckpt" / "last").exists()
        return
    step = meta["step"]
    assert all(torch.all(p == float(step)) for p in model.parameters()), f"weights of another step than {step}"
    # the next save replaces the leftovers of the killed one
    Checkpointer(tmp_path / "ckpt", "fp").save("last", model, None, {"step": step})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last"]
