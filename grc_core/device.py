"""The `device` param of every core config: "cpu", "cuda", "cuda:1", or "auto" (CUDA where present)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    return dev


def set_threads(threads: int) -> None:
    """torch intra-op threads of this process; 0 leaves torch's default."""
    if threads > 0:
        torch.set_num_threads(threads)


@contextmanager
def thread_scope(threads: int) -> Iterator[None]:
    """`set_threads(threads)` for the block; the process's thread count is restored after it."""
    before = torch.get_num_threads()
    set_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
