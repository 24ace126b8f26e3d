"""Training checkpoints on disk, for every training loop (backbone, SFT, GRPO, SASRec).

Light on purpose (torch and safetensors only): the offload scripts in benchmarks/ use it on GPU
workers that lack the pipeline's stack.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from grc_core.train import load_optimizer_tensors, optimizer_tensors, unwrap

log = logging.getLogger(__name__)


class Checkpointer:
    """A training loop's checkpoints under `ckpt_dir`: `last/` (weights, optimizer moments, the
    loop's state as JSON) and `best/` (weights and state). Each is written to a temp folder and
    renamed, so a kill leaves the previous one whole. `resume` loads `last` only if it was written
    under the same `fingerprint` (tasks/stages.py); otherwise it removes every checkpoint, says so
    in a warning naming the step it discards (a changed param, input or line of the stage's code
    starts training afresh, as `dvc repro` would), and the loop starts afresh. The loops in
    grc_core take this object and write no files themselves."""

    def __init__(self, ckpt_dir: Path, fingerprint: str):
        self.dir, self.fingerprint = Path(ckpt_dir), fingerprint

    def resume(self, model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any] | None:
        last = self.dir / "last"
        if not (last / "trainer.json").exists():
            return None
        meta = json.loads((last / "trainer.json").read_text())
        if meta.get("fingerprint") != self.fingerprint:
            state = meta.get("state", meta)
            log.warning("%s: discarding the checkpoint of epoch %s, step %s: it was written under another "
                        "fingerprint (the stage's params, inputs or code changed since); training starts afresh",
                        self.dir, state.get("epoch", "?"), state.get("step", "?"))
            shutil.rmtree(self.dir)
            return None
        self.load_weights("last", model)
        if opt is not None and (last / "optimizer.safetensors").exists():
            load_optimizer_tensors(opt, load_file(str(last / "optimizer.safetensors")))
        return meta

    def save(self, name: str, model: nn.Module, opt: torch.optim.Optimizer | None, meta: dict[str, Any]) -> None:
        path = self.dir / name
        tmp, old = path.with_name(name + ".tmp"), path.with_name(name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()},
                  str(tmp / "model.safetensors"))
        if opt is not None:
            save_file({k: v.cpu().contiguous() for k, v in optimizer_tensors(opt).items()},
                      str(tmp / "optimizer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps({**meta, "fingerprint": self.fingerprint}, indent=2, default=str))
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    def load_weights(self, name: str, model: nn.Module) -> None:
        unwrap(model).load_state_dict(load_file(str(self.dir / name / "model.safetensors")))
