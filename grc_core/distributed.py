"""torch.distributed for the training loops: process group, DDP wrapping, rank-0 duties.

Launch any training entry point under `torchrun` (see `tasks/ddp.py`); `init_from_env()` joins
the process group that torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...)
with gloo on CPU and nccl on CUDA. Without torchrun everything here is a no-op and the loops
run single-process.

Our losses call several methods of a model (encode, decode, reflect...), not only `forward`,
and DistributedDataParallel synchronises gradients only for work done inside its `forward`.
`LossModule` therefore makes the whole loss closure the forward pass: `ddp(loss_fn, batch)`
runs `loss_fn(model, batch)` inside DDP, so every parameter the loss touched is all-reduced
(averaged over ranks) during `backward()`. `find_unused_parameters=True` because a step may
leave some weights out (e.g. attribute heads of a variant).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def init_from_env(device: torch.device | str = "cpu") -> tuple[int, int]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); (0, 1) when not under torchrun."""
    if is_distributed():
        return rank_world()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank_world()


def shutdown() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (identity outside a process group)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class LossModule(nn.Module):
    """`forward(fn, *args)` = `fn(model, *args)`: lets DDP see a whole loss computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return fn(self.model, *args)


def wrap_for_loss(model: nn.Module) -> nn.Module:
    """A module to call as `wrapped(loss_fn, *args)`: DDP over `LossModule` inside a process group,
    the plain `LossModule` otherwise (same call, no synchronisation)."""
    inner = LossModule(model)
    if not is_distributed():
        return inner
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(inner, device_ids=ids, find_unused_parameters=True)


def broadcast_float(value: float, src: int = 0) -> float:
    """Rank `src`'s value on every rank (a float64 tensor broadcast; nothing is pickled)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src)
    return float(t.item())
