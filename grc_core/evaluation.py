"""Full-catalog ranking through constrained beam search, and the leave-one-out metrics of it."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from grc_core import metrics as M
from grc_core.beam_search import beam_search
from grc_core.data import Instances, ItemTable, to_batch
from grc_core.model import BackboneStepper, Seq2Seq
from grc_core.trie import PrefixTrie


@torch.inference_mode()
def rank_with_backbone(model: Seq2Seq, inst: Instances, table: ItemTable, trie: PrefixTrie, width: int,
                       batch_size: int = 256, progress: Callable[[int], None] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Top-`width` items (N, W) and their scores for every instance, by beam search."""
    model.eval()
    stepper = BackboneStepper(model)
    items, scores = [], []
    for start in range(0, len(inst), batch_size):
        part = inst.select(torch.arange(start, min(start + batch_size, len(inst))))
        res = beam_search(stepper, to_batch(part, table, with_target=False), trie, width)
        items.append(res.items.cpu().numpy())
        scores.append(res.scores.float().cpu().numpy())
        if progress is not None:
            progress(len(part))
    return np.concatenate(items), np.concatenate(scores)  # (N, W), (N, W)


def ranking_metrics(ranked: np.ndarray, targets: np.ndarray, ks=M.DEFAULT_KS) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    ks = tuple(k for k in ks if k <= ranked.shape[1])
    per_user = M.per_user_metrics(M.target_ranks(ranked, targets), ks, tuple(k for k in M.NDCG_KS if k in ks))
    return M.summarize(per_user), per_user
