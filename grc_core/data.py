"""Instances as tensors: item-id histories -> model batches of semantic-ID codes and attributes.

Histories are left-padded with -1 so the most recent item always sits at position T-1
(position embeddings then mean "k items ago"). `to_batch` drops the columns that are padding in
every row of a batch; the encoder aligns its positions to the end of the window, so a batch of
short histories costs what its longest history needs and means what the full-width batch means.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from grc_core.model import Batch

PAD = -1


class Instances(NamedTuple):
    user: torch.Tensor  # (N,) int64
    history: torch.Tensor  # (N, T) int64 item ids, left-padded with PAD
    target: torch.Tensor  # (N,) int64 item id

    def __len__(self) -> int:
        return self.target.shape[0]

    def select(self, idx: torch.Tensor) -> "Instances":
        return Instances(self.user[idx], self.history[idx], self.target[idx])


class ItemTable(NamedTuple):
    codes: torch.Tensor  # (N_items, L) int64 semantic IDs
    attrs: torch.Tensor  # (N_items, A) int64 attribute buckets (0 = unknown)

    def to(self, device: torch.device | str) -> "ItemTable":
        return ItemTable(self.codes.to(device), self.attrs.to(device))


def pad_histories(histories: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """Lists of item ids -> (N, max_len) int64, left-padded with PAD, keeping the last max_len."""
    out = np.full((len(histories), max_len), PAD, dtype=np.int64)
    for i, h in enumerate(histories):
        h = list(h)[-max_len:]
        if h:
            out[i, max_len - len(h):] = h
    return torch.from_numpy(out)


def make_instances(users: Sequence[int], histories: Sequence[Sequence[int]], targets: Sequence[int],
                   max_len: int) -> Instances:
    return Instances(torch.as_tensor(np.asarray(users, dtype=np.int64)), pad_histories(histories, max_len),
                     torch.as_tensor(np.asarray(targets, dtype=np.int64)))


def history_mask(history: torch.Tensor, n_items: int) -> torch.Tensor:
    """(B, T) item ids, PAD < 0 -> (B, N) bool, True for the items in each user's history."""
    out = torch.zeros(history.shape[0], n_items + 1, dtype=torch.bool, device=history.device)
    out.scatter_(1, torch.where(history >= 0, history, n_items), True)  # padding lands in column N
    return out[:, :n_items]


def by_history_length(inst: Instances) -> torch.Tensor:
    """(N,) int64: the instances ordered by history length, shortest first (ties in their order).
    Batches cut from this order are narrow where histories are short (`to_batch` trims them)."""
    return torch.argsort((inst.history != PAD).sum(1), stable=True)


def to_batch(inst: Instances, table: ItemTable, with_target: bool = True, trim: bool = True) -> Batch:
    """The model batch of `inst`; `trim`: without the columns that are padding in every row."""
    hist = inst.history.to(table.codes.device)  # (B, T)
    keep = hist != PAD  # (B, T)
    if trim:  # positions are end-aligned, so the dropped columns mean nothing
        first = int(keep.any(0).to(torch.int8).argmax())  # the first column with an item (0 if none has)
        hist, keep = hist[:, first:], keep[:, first:]
    safe = hist.clamp(min=0)
    codes = table.codes[safe] * keep[..., None]  # (B, T, L)
    attrs = table.attrs[safe] * keep[..., None]  # (B, T, A)
    target = table.codes[inst.target.to(table.codes.device)] if with_target else None  # (B, L)
    return Batch(codes, attrs, keep, target, safe * keep)


def user_folds(users: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold (0..folds-1) of each user id: a seeded splitmix64 hash, so a user's fold is the same
    in every split and for every subset."""
    with np.errstate(over="ignore"):
        x = users.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(folds)).astype(np.int64)
