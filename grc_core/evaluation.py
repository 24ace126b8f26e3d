"""Full-catalog ranking through constrained beam search (backbone or two-pass GRC), its metrics,
and the reflection-quality statistics of GRC (the paper's Table 2)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import torch

from grc_core import metrics as M
from grc_core.beam_search import beam_search
from grc_core.cf_value import item_prefix_nodes, prefix_values
from grc_core.data import Instances, ItemTable, by_history_length, history_mask, to_batch
from grc_core.grc import DecodeConfig, GRCModel, GRCResult, grc_decode
from grc_core.model import BackboneStepper, Seq2Seq
from grc_core.rewards import first_divergence
from grc_core.trie import PrefixTrie
from grc_core.ved import CFValue, ved_decode


@torch.inference_mode()
def rank_with_backbone(model: Seq2Seq, inst: Instances, table: ItemTable, trie: PrefixTrie, width: int,
                       batch_size: int = 256, progress: Callable[[int], None] | None = None,
                       exclude_history: bool = False, item_logp: Callable[[Instances], torch.Tensor] | None = None,
                       cf_weight: float = 0.0, cf_mode: str = "shallow",
                       experts: Sequence[tuple[Callable[[Instances], torch.Tensor], float]] = ()
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Top-`width` items (N, W) and their scores for every instance, by beam search.

    `exclude_history`: a user's history items are never returned (masked inside the search).
    `item_logp(instances)` (B, N): a collaborative model's item log-probabilities; with it each
    level prunes on log pi + cf_weight * V_cf (grc_core/cf_value.py), the method `tiger_cf`;
    `cf_mode` "levelwise" fuses within each level instead (`beam_search`'s `value_mode`).
    `experts`: more (item log-probabilities, weight) pairs; the beam then prunes on
    log pi + sum_k w_k V_k, each V_k the prefix value of expert k (e.g. the backbone's own dense
    head, `dense_item_logp`, beside SASRec's).
    """
    model.eval()
    stepper = BackboneStepper(model)
    items, scores = [], []
    n_items = table.codes.shape[0]
    sources = ([(item_logp, cf_weight)] if item_logp is not None else []) + [(f, w) for f, w in experts if w != 0]
    nodes = item_prefix_nodes(trie) if sources else None
    order = by_history_length(inst)  # batches of alike lengths: to_batch trims each to its longest history
    for start in range(0, len(inst), batch_size):
        part = inst.select(order[start:start + batch_size])
        exclude = history_mask(part.history.to(table.codes.device), n_items) if exclude_history else None
        per_source = [prefix_values(f(part).to(table.codes.device), nodes, trie, exclude) for f, _ in sources]
        values, weight = (per_source[0], sources[0][1]) if len(sources) == 1 else (None, 0.0)
        if len(sources) > 1:  # one value, the weighted sum, at weight 1 (beam_search is linear in w * value)
            values = [sum(w * v[level] for (_, w), v in zip(sources, per_source)) for level in range(trie.num_levels)]
            weight = 1.0
        res = beam_search(stepper, to_batch(part, table, with_target=False), trie, width, exclude=exclude,
                          values=values, value_weight=weight, value_mode=cf_mode)
        items.append(res.items.cpu().numpy())
        scores.append(res.scores.float().cpu().numpy())
        if progress is not None:
            progress(len(part))
    back = torch.argsort(order).numpy()  # rows in the instances' order again
    return np.concatenate(items)[back], np.concatenate(scores)[back]  # (N, W), (N, W)


def dense_item_logp(model: Seq2Seq, table: ItemTable) -> Callable[[Instances], torch.Tensor]:
    """Instances (B,) -> the backbone's own dense head's log-softmax over the catalog, (B, N)
    (`Seq2Seq.dense_log_probs`; a backbone built with `dense_head`)."""
    return lambda inst: model.dense_log_probs(to_batch(inst, table, with_target=False))


def ranking_metrics(ranked: np.ndarray, targets: np.ndarray, ks=M.DEFAULT_KS) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    ks = tuple(k for k in ks if k <= ranked.shape[1])
    per_user = M.per_user_metrics(M.target_ranks(ranked, targets), ks, tuple(k for k in M.NDCG_KS if k in ks))
    return M.summarize(per_user), per_user


class ReflectionStats:
    """Running sums for the paper's Table 2 and the correction behaviour, over many batches.

    Acc_loc@k / Acc_cat@k: share of the top-k first-pass drafts whose predicted r_loc / first
    attribute's r_sem equals the true label. Copy rate: share of corrected beams equal to the
    draft they came from. Fix / break rate, per draft among the top 10 that went to correction,
    with its best corrected beam: wrong draft turned right / right draft turned wrong.
    """

    ENTROPY_EDGES = np.linspace(0.0, 2.0, 41)  # mean slot entropy is at most log(L+1) <= 2 for L <= 6

    def __init__(self, ks: tuple[int, ...] = (5, 10)):
        self.ks = ks
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.entropy_counts = np.zeros(len(self.ENTROPY_EDGES) - 1, dtype=np.int64)

    def _add(self, key: str, hits: torch.Tensor, valid: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float((hits & valid).sum())
        self.counts[key] = self.counts.get(key, 0.0) + float(valid.sum())

    def update(self, res: GRCResult, target: torch.Tensor, table: ItemTable) -> None:
        drafts = res.drafts
        tgt_codes = table.codes[target]  # (B, L)
        real = drafts.items >= 0  # (B, W)
        true_loc = first_divergence(drafts.codes.clamp_min(0).flatten(0, 1),
                                    tgt_codes.repeat_interleave(drafts.codes.shape[1], 0)).view_as(real)
        has_reflection = res.reflection.shape[-1] > 0
        if has_reflection:
            ent = res.entropy[real].float().cpu().numpy()
            self.entropy_counts += np.histogram(np.clip(ent, 0.0, 2.0), self.ENTROPY_EDGES)[0]
        for k in self.ks:
            top = real.clone()
            top[:, k:] = False
            if has_reflection:
                self._add(f"acc_loc@{k}", res.reflection[..., 0] == true_loc, top)
                if res.reflection.shape[-1] > 1:
                    same = table.attrs[drafts.items.clamp_min(0), 0] == table.attrs[target, 0][:, None]  # (B, W)
                    self._add(f"acc_cat@{k}", res.reflection[..., 1] == same.long(), top)
        cor, src = res.corrected.items, res.source  # (B, Wc)
        if cor.shape[1] == 0:  # rank_rule "verify": no correction pass
            return
        live = cor >= 0
        draft_of = drafts.items.gather(1, src.clamp_min(0))  # (B, Wc)
        self._add("copy_rate", cor == draft_of, live)
        hit_draft = drafts.items == target[:, None]  # (B, W)
        hit_cor = cor == target[:, None]  # (B, Wc)
        w = min(10, drafts.items.shape[1])
        for b_idx in range(w):
            mine = live & (src == b_idx)  # (B, Wc)
            has = mine.any(1)  # (B,)
            first = mine.float().argmax(1)  # (B,) best corrected beam from this draft
            right_after = hit_cor.gather(1, first[:, None])[:, 0]
            right_before = hit_draft[:, b_idx]
            self._add("fix_rate", right_after, has & ~right_before)
            self._add("break_rate", ~right_after, has & right_before)
        self._add("corrected_share@10", (res.reflection[:, :w, 0] <= tgt_codes.shape[1]) if has_reflection
                  else torch.ones_like(real[:, :w]), real[:, :w])

    def summary(self) -> dict:
        out: dict = {k: self.sums[k] / self.counts[k] if self.counts[k] else float("nan") for k in self.sums}
        if self.entropy_counts.sum():
            out["entropy_hist"] = {"edges": self.ENTROPY_EDGES.tolist(), "counts": self.entropy_counts.tolist()}
        return out


@torch.inference_mode()
def rank_with_grc(model: GRCModel, inst: Instances, table: ItemTable, trie: PrefixTrie, cfg: DecodeConfig,
                  batch_size: int = 64, progress: Callable[[int], None] | None = None,
                  stats: ReflectionStats | None = None, exclude_history: bool = False,
                  item_logp: Callable[[Instances], torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-`cfg.width` items (N, W) of two-pass GRC decoding for every instance, and their merge scores.
    `item_logp`: a collaborative model's item log-probabilities, used where cfg.cf_weight > 0, and as
    VED's value (V_cf) where the drafts come from VED (cfg.draft_ved: `cfg.width` candidates per user)."""
    model.eval()
    items, scores = [], []
    n_items = table.codes.shape[0]
    use_cf = cfg.cf_weight > 0 or cfg.draft_ved is not None
    if use_cf and item_logp is None:
        raise ValueError("rank_with_grc: cf_weight > 0 or VED drafts need the collaborative model's item_logp")
    ved_cfg = replace(cfg.draft_ved, candidates=cfg.width) if cfg.draft_ved is not None else None
    nodes = item_prefix_nodes(trie) if ved_cfg is not None else None
    gen = torch.Generator(device=table.codes.device).manual_seed(0)  # VED's expand="sample" only
    for start in range(0, len(inst), batch_size):
        part = inst.select(torch.arange(start, min(start + batch_size, len(inst))))
        exclude = history_mask(part.history.to(table.codes.device), n_items) if exclude_history else None
        logp = item_logp(part).to(table.codes.device) if use_cf else None
        batch = to_batch(part, table, with_target=False)
        drafts = None
        if ved_cfg is not None:
            value = CFValue(prefix_values(logp, nodes, trie, exclude))
            drafts = ved_decode(model.seq, batch, trie, ved_cfg, value, exclude, gen).items  # (B, W)
        res = grc_decode(model, batch, trie, cfg, exclude, logp, drafts)
        if stats is not None:
            stats.update(res, part.target.to(res.items.device), table)
        items.append(res.items.cpu().numpy())
        scores.append(res.scores.float().cpu().numpy())
        if progress is not None:
            progress(len(part))
    return np.concatenate(items), np.concatenate(scores)
