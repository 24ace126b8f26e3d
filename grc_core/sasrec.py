"""SASRec, the sequential baseline (Kang & McAuley 2018, "Self-Attentive Sequential Recommendation").

Items are embedded (shared input/output table E, Sec. 3.1 and 3.5), a learned positional
embedding is added, and `layers` causal self-attention blocks (Sec. 3.2-3.3) turn the history
into one state per position; the state F_t scores every item i by r_{i,t} = F_t . E_i (Eq. 6).

Training data: each user's training sequence s_1..s_m is rebuilt from the split's training rows
(`training_sequences`: the first row's history followed by every row's target, in target_pos
order) and cut from its end into windows of max_len + 1 items that overlap by one, so every
training target is predicted exactly once per epoch, from at most max_len items of context.

Deviations and choices:
- Loss: full-softmax cross-entropy over all N items at every non-padded position, not the
  paper's binary cross-entropy with one sampled negative (Eq. 7); CE is much stronger
  (Klenitskiy & Vasilkov 2023, "Turning Dross Into Gold Loss", SASRec+).
- Repeat bias (`repeat_bias`, an addition): one learned scalar beta, initialised at 0, is added
  to the score of every item already in the visible history, r_{i,t} += beta * [i in s_1..s_t].
  With a shared embedding F_t stays close to E_{s_t}, so the paper's model puts the last item
  first for most users (about 60% on scientific, whose sequences never repeat an item); beta learns
  from the training targets how likely a repeat is (about -8 there; it could as well turn
  positive). Nothing is removed from the ranking; with it off, scores are the paper's Eq. 6.
- Item ids are shifted by one inside the model; 0 is the padding id, its embedding row is 0
  and is never scored. Histories are left-padded and positions count from the oldest real
  item (the paper counts from the left of the padded array, so the last item always sits at
  max_len - 1). So extra left padding changes nothing, and the state at position t of a
  training window is exactly the inference state of that window's prefix s_1..s_t, which in
  the paper's scheme it is not (its position ids tell how many items follow).
- Attention masks padded keys; every query may attend to itself, so an all-padding prefix
  gives a finite (unused) state instead of a NaN. Blocks are pre-LayerNorm on queries, keys and
  values alike (the paper normalises queries only); a final LayerNorm precedes scoring.
- Embeddings are not multiplied by sqrt(D) and start at N(0, 0.02^2); the output uses the
  same table (weight tying, as in the paper's Sec. 3.5 "shared item embedding").
- Model selection: validation Recall@10 (full ranking, history items not removed) after every
  epoch, ties broken by NDCG@10; the best epoch's weights are returned, training stops after
  `patience` epochs without improvement. AdamW decays matrices and embeddings only, not
  biases, LayerNorms or the repeat bias.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grc_core.config import SASRecConfig
from grc_core.metrics import per_user_metrics, summarize, target_ranks
from grc_core.train import Checkpoints
from grc_core.device import resolve_device, thread_scope

PAD = 0
_IGNORE = -100  # F.cross_entropy's ignore_index
_EVAL_CHUNK = 1024  # users per scoring block: bounds memory at _EVAL_CHUNK * N floats
# The repeat bias is _REPEAT_SCALE * b: Adam moves a scalar by about lr per step, too slowly to
# reach an offset of ~-10 logits within the ~20 epochs before early stopping.
_REPEAT_SCALE = 10.0




class SeqRows(NamedTuple):
    """Rows of a leave-one-out split (splits/*.parquet), one per (user, target)."""

    histories: Sequence[Sequence[int]]  # B lists of item ids, oldest first
    targets: np.ndarray  # (B,) item ids
    users: np.ndarray | None = None  # (B,) user_id; needed for training rows only
    positions: np.ndarray | None = None  # (B,) target_pos; needed for training rows only

    def select(self, idx: np.ndarray) -> "SeqRows":
        """The rows at `idx` (int indices), in that order."""
        pick = (lambda a: None if a is None else a[idx])
        return SeqRows([self.histories[i] for i in idx], self.targets[idx], pick(self.users), pick(self.positions))


class Windows(NamedTuple):
    inputs: torch.Tensor  # (S, T) shifted ids (item + 1), left-padded with 0
    labels: torch.Tensor  # (S, T) next item ids 0..N-1, -100 at padding


def _check_ids(ids: np.ndarray, n_items: int, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= n_items):
        raise ValueError(f"{what}: item ids must lie in [0, {n_items}), got range [{ids.min()}, {ids.max()}]")


def training_sequences(rows: SeqRows) -> list[list[int]]:
    """Each user's training sequence: the first row's history, then the targets by position.

    Rows of one user must have consecutive positions and the first row's history must be
    complete (len(history) == its target_pos), as in the splits built by the ingest stage.
    """
    if rows.users is None or rows.positions is None:
        raise ValueError("training_sequences: training rows need users and positions (user_id, target_pos)")
    users, pos = np.asarray(rows.users), np.asarray(rows.positions)
    targets = np.asarray(rows.targets)
    if not (len(rows.histories) == len(targets) == len(users) == len(pos)):
        raise ValueError("training_sequences: histories, targets, users and positions differ in length")
    order = np.lexsort((pos, users))  # by user, then position
    seqs: list[list[int]] = []
    start = 0
    while start < len(order):
        stop = start
        while stop < len(order) and users[order[stop]] == users[order[start]]:
            stop += 1
        idx = order[start:stop]
        first = idx[0]
        if len(rows.histories[first]) != pos[first] or np.any(np.diff(pos[idx]) != 1):
            raise ValueError(
                f"training_sequences: user {users[first]} has an incomplete first history or a gap in target_pos"
            )
        seqs.append([int(i) for i in rows.histories[first]] + [int(t) for t in targets[idx]])
        start = stop
    return seqs


def sequence_windows(sequences: Sequence[Sequence[int]], max_len: int) -> Windows:
    """Cut every sequence from its end into (input, next-item) windows of up to max_len steps.

    Consecutive windows overlap by one item, so each item after the first is a label once.
    """
    inputs, labels = [], []
    for seq in sequences:
        end = len(seq)
        while end > 1:
            start = max(0, end - max_len - 1)
            chunk = np.asarray(seq[start:end], dtype=np.int64)
            pad = max_len + 1 - len(chunk)
            inputs.append(np.concatenate([np.zeros(pad, np.int64), chunk[:-1] + 1]))
            labels.append(np.concatenate([np.full(pad, _IGNORE, np.int64), chunk[1:]]))
            end = start + 1
    if not inputs:
        raise ValueError("sequence_windows: no sequence has two or more items")
    return Windows(torch.as_tensor(np.stack(inputs)), torch.as_tensor(np.stack(labels)))  # (S, T) x2


def encode_histories(histories: Sequence[Sequence[int]], max_len: int, n_items: int) -> torch.Tensor:
    """Left-padded shifted ids of the last max_len items of each history: (B, T), T <= max_len."""
    width = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    out = np.zeros((len(histories), width), dtype=np.int64)
    for row, h in enumerate(histories):
        tail = np.asarray(h, dtype=np.int64)[-max_len:] if len(h) else np.zeros(0, np.int64)
        _check_ids(tail, n_items, "encode_histories")
        if len(tail):
            out[row, width - len(tail):] = tail + 1
    return torch.as_tensor(out)  # (B, T)


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D/H)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], dropout_p=p)  # (B, H, T, D/H)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class Block(nn.Module):
    """Self-attention then a point-wise feed-forward net, each residual (Sec. 3.2-3.4)."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), allowed))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=PAD)  # row 0 = padding
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.repeat_bias = nn.Parameter(torch.zeros(())) if cfg.repeat_bias else None
        self.apply(_init_weights)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Hidden state F_t at every position of left-padded shifted ids (B, T): (B, T, D)."""
        b, t = seqs.shape
        real = seqs != PAD  # (B, T)
        pos = (real.cumsum(1) - 1).clamp_min(0)  # (B, T) 0 at the oldest real item
        x = (self.item_emb(seqs) + self.pos_emb(pos)) * real[..., None]  # (B, T, D)
        x = self.drop(x)
        causal = torch.ones(t, t, dtype=torch.bool, device=seqs.device).tril()  # (T, T)
        eye = torch.eye(t, dtype=torch.bool, device=seqs.device)  # (T, T)
        allowed = (causal & real[:, None, :]) | eye  # (B, T, T) query x key
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_f(x)  # (B, T, D)

    def architecture(self) -> dict:
        """What `from_architecture` rebuilds this model from: the sasrec stage's `config.json`, and the
        `cf_sasrec` field of a backbone that holds this model (grc_core/model.py `cf_token`)."""
        return {"config": asdict(self.cfg), "n_items": self.n_items}

    @classmethod
    def from_architecture(cls, arch: dict) -> "SASRec":
        """An untrained model of the architecture `architecture` recorded; the caller loads the weights."""
        return cls(arch["n_items"], SASRecConfig(**arch["config"]))

    def repeat_offset(self) -> float | None:
        """The learned beta, in logits, added to history items (None when repeat_bias is off)."""
        return None if self.repeat_bias is None else _REPEAT_SCALE * float(self.repeat_bias.detach())

    def item_scores(self, states: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """r_i = F . E_i for every real item (Eq. 6, shared embedding), plus the repeat bias: (P, N).

        states (P, D); visible (P, T) the shifted ids each state has seen (0 = pad or unseen).
        """
        scores = states @ self.item_emb.weight[1:].T  # (P, N)
        if self.repeat_bias is None:
            return scores
        seen = torch.zeros(scores.shape[0], self.n_items + 1, device=scores.device)
        seen = seen.scatter_(1, visible, 1.0)[:, 1:]  # (P, N) 1 where the item is in the history
        return scores + _REPEAT_SCALE * self.repeat_bias * seen


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


def _device(model: SASRec) -> torch.device:
    return model.item_emb.weight.device


def visible_prefixes(seqs: torch.Tensor) -> torch.Tensor:
    """The ids each position sees, itself included, others zeroed: (B, T) -> (B, T, T)."""
    t = seqs.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seqs.device).tril()  # (T, T)
    return seqs[:, None, :] * causal  # (B, T, T)


def sasrec_loss(model: SASRec, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean full-softmax cross-entropy over the non-padded positions of a batch of windows."""
    states = model(inputs)  # (B, T, D)
    keep = labels != _IGNORE  # (B, T)
    scores = model.item_scores(states[keep], visible_prefixes(inputs)[keep])  # (P, N)
    return F.cross_entropy(scores, labels[keep])


def length_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator,
                   pool: int = 32) -> list[torch.Tensor]:
    """Random mini-batches of windows of similar length, in random order.

    A random permutation is cut into pools of `pool` batches; each pool is sorted by length
    before it is split, so a batch rarely mixes a 2-item window with a 20-item one.
    """
    perm = torch.randperm(lengths.shape[0], generator=gen)  # (S,)
    batches = []
    for chunk in perm.split(batch_size * pool):
        order = torch.sort(lengths[chunk], stable=True).indices  # (C,)
        batches.extend(chunk[order].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def train_epoch(model: SASRec, windows: Windows, opt: torch.optim.Optimizer, batch_size: int,
                gen: torch.Generator) -> float:
    """One pass over the windows in length-bucketed mini-batches; the label-weighted mean loss.

    Each batch is cut to its longest window: dropping all-padding columns on the left
    changes no output.
    """
    model.train()
    dev = _device(model)
    lengths = (windows.labels != _IGNORE).sum(1)  # (S,)
    total, count = 0.0, 0
    for idx in length_batches(lengths, batch_size, gen):
        width = int(lengths[idx].max())
        inputs = windows.inputs[idx, -width:].to(dev)  # (B, t)
        labels = windows.labels[idx, -width:].to(dev)  # (B, t)
        loss = sasrec_loss(model, inputs, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n = int((labels != _IGNORE).sum())
        total += float(loss.detach()) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def score_all(model: SASRec, histories: Sequence[Sequence[int]]) -> np.ndarray:
    """Scores of all N items after each history (the last position's state): (B, N) float32."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(histories), _EVAL_CHUNK):
        seqs = encode_histories(histories[start:start + _EVAL_CHUNK], model.cfg.max_len, model.n_items)  # (b, T)
        seqs = seqs.to(_device(model))
        states = model(seqs)[:, -1]  # (b, D)
        parts.append(model.item_scores(states, seqs).float().cpu().numpy())  # (b, N)
    model.train(was_training)
    return np.concatenate(parts) if parts else np.zeros((0, model.n_items), np.float32)  # (B, N)


def topk_items(model: SASRec, histories: Sequence[Sequence[int]], k: int,
               exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """The k best item ids per history, best first: (B, k) int64.

    `exclude[b]` lists items never to recommend for row b (e.g. its history); left out, every
    item is ranked, as the leave-one-out evaluation here requires (targets may repeat).
    """
    if not 1 <= k <= model.n_items:
        raise ValueError(f"topk_items: k must be in [1, {model.n_items}], got {k}")
    if exclude is not None and len(exclude) != len(histories):
        raise ValueError(f"topk_items: {len(exclude)} exclude lists for {len(histories)} histories")
    out = []
    for start in range(0, len(histories), _EVAL_CHUNK):
        chunk = histories[start:start + _EVAL_CHUNK]
        scores = torch.as_tensor(score_all(model, chunk))  # (b, N)
        if exclude is not None:
            for row, items in enumerate(exclude[start:start + _EVAL_CHUNK]):
                banned = np.asarray(items, dtype=np.int64)
                _check_ids(banned, model.n_items, "topk_items exclude")
                scores[row, banned] = -math.inf
        out.append(scores.topk(k, dim=1).indices.numpy())  # (b, k)
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)  # (B, k)


def evaluate(model: SASRec, rows: SeqRows, ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """Recall@k and NDCG@k of the held-out targets under full ranking (grc_core.metrics)."""
    targets = np.asarray(rows.targets)
    _check_ids(targets, model.n_items, "evaluate")
    ranked = topk_items(model, rows.histories, max(ks))  # (B, K)
    per_user = per_user_metrics(target_ranks(ranked, targets), ks=ks, ndcg_ks=ks)
    return summarize(per_user)


def _optimizer(model: SASRec, cfg: SASRecConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def best_record(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The epoch record whose weights `train_sasrec` keeps: the best (Recall@10, NDCG@10) on
    validation, the first on a tie ({} for an empty history)."""
    return max(history, key=lambda r: (r["valid_recall@10"], r["valid_ndcg@10"])) if history else {}


def train_sasrec(
    train_rows: SeqRows,
    valid_rows: SeqRows,
    n_items: int,
    cfg: SASRecConfig,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    ckpt: Checkpoints | None = None,
) -> tuple[SASRec, list[dict[str, Any]]]:
    """Train on the training rows, keep the epoch with the best validation Recall@10 (then NDCG@10).

    Returns (model in eval mode with the best weights, one history record per epoch).
    `progress(epoch, record)` is called after each epoch. Deterministic on CPU for a given
    cfg.seed; the global RNG state is left untouched. With `ckpt`, every epoch ends with a `last`
    checkpoint (weights, optimizer, the shuffle and dropout generator states, the log) and each
    better epoch with a `best` one; a run resumed from `last` ends with the same weights.
    """
    if n_items < 1:
        raise ValueError(f"train_sasrec: n_items must be >= 1, got {n_items}")
    sequences = training_sequences(train_rows)
    for seq in sequences:
        _check_ids(np.asarray(seq), n_items, "train_sasrec")
    windows = sequence_windows(sequences, cfg.max_len)
    if len(valid_rows.histories) == 0 or len(valid_rows.histories) != len(valid_rows.targets):
        raise ValueError("train_sasrec: valid_rows must be non-empty with one target per history")
    device = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    with thread_scope(cfg.threads), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model = SASRec(n_items, cfg).to(device)
        opt = _optimizer(model, cfg)
        best, best_state, since_best = (-1.0, -1.0), None, 0
        history: list[dict[str, Any]] = []
        start = 0
        meta = ckpt.resume(model, opt) if ckpt is not None else None
        if meta is not None:
            start, best, since_best, history = meta["epoch"], tuple(meta["best"]), meta["since_best"], meta["history"]
            gen.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
            torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))  # dropout's
            if since_best >= cfg.patience:
                start = cfg.epochs  # it had stopped early
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            loss = train_epoch(model, windows, opt, cfg.batch_size, gen)
            valid = evaluate(model, valid_rows)
            record = {"epoch": epoch, "loss": loss, **{f"valid_{k}": v for k, v in valid.items()},
                      "seconds": time.perf_counter() - t0}
            history.append(record)
            if progress is not None:
                progress(epoch, record)
            key = (valid["recall@10"], valid["ndcg@10"])
            improved = key > best
            if improved:
                best, since_best = key, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            if ckpt is not None:
                if improved:
                    ckpt.save("best", model, None, {"epoch": epoch + 1})
                ckpt.save("last", model, opt, {"epoch": epoch + 1, "best": list(best), "since_best": since_best,
                                               "history": history, "generator": gen.get_state().tolist(),
                                               "torch_rng": torch.get_rng_state().tolist()})
            if since_best >= cfg.patience:
                break
    if ckpt is not None:
        ckpt.load_weights("best", model)
    else:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


def fuse_log_probs(first: torch.Tensor, others: Sequence[torch.Tensor], weight: float) -> torch.Tensor:
    """An ensemble's item log-distribution (B, N): log softmax(log p_0 + w * mean_k log p_k), the
    product p_0 * (prod_k p_k)^(w/K) renormalised per row. `first` unchanged with no others or w 0.
    -inf entries (excluded items) stay -inf."""
    if not others or weight == 0:
        return first
    return torch.log_softmax(first + weight * torch.stack(list(others)).mean(0), -1)


def top_by_log_probs(logp: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best items (B, k) by `logp` (log-probabilities, or any scores such as logits) and their
    scores, best first, ties to the smaller item id; -inf (excluded) items come back as padding
    (-1, -inf), like the beam's."""
    order = torch.sort(-logp, dim=1, stable=True).indices[:, :k]  # (B, k)
    top = torch.gather(logp, 1, order)
    return torch.where(torch.isneginf(top), -1, order).numpy(), top.numpy()
