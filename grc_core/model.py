"""TIGER-style encoder-decoder over semantic IDs (GRC paper Sec. 3.2 and 5.1).

Encoder input, `layout="item"` (default): one position per history item, the sum of its
code embeddings (one table per level), its attribute-bucket embeddings (the paper feeds
attribute features to the encoder of every method) and a position embedding. Positions are
counted from the end of the window (the most recent item is always max_history - 1), so a batch
may be narrower than max_history (grc_core/data.py `to_batch` drops all-padding columns) and a
backbone reads a shorter window than it was built for with the same meaning. This costs
L times fewer encoder positions than TIGER's one position per code; `layout="code"` gives
TIGER's layout (each code its own position, with level and item-position embeddings).

Decoder: BOS then the target's codes; position t predicts level t's code from its own
output head (each level has its own vocabulary). The decoder takes any sequence of input
embeddings and an optional self-attention mask, so the GRC template (issue 5) reuses it.
Every use of the decoder layers goes through one function, `decoder_step` (C new positions on
top of a self-attention KV cache): teacher forcing (`Seq2Seq.decode`, empty cache), the beam
search's `BackboneStepper`, GRC's reflection and correction passes and GRPO's sampler.
`reference_decode` writes the same decoder out with explicit attention and no cache, for
parity tests.

Deviations from the paper / TIGER:
- Pre-LayerNorm blocks with learned absolute positions instead of T5's relative bias.
- Per-level input tables and output heads instead of one shared token vocabulary.
- No dropout by default: 0.1 (1.14x a CPU step) was not better on ml-100k validation at ten or
  twenty epochs (docs/DESIGN.md 'Dropout').

Beyond the paper, `cf_token` (off by default): the model holds the frozen SASRec of the sasrec
stage and appends one memory position to the encoder's output, `W F(x)`, SASRec's last hidden
state over the same history projected to D (then the encoder's final LayerNorm, like every
other position). The decoder's cross-attention, and so every level's prediction, can read what
the collaborative model knows of the user; only `W` and the TIGER weights learn. The SASRec
weights are stored with the backbone's (`cf.*`) and its architecture in `config.json`
(`cf_sasrec`), so every later stage rebuilds the same model from the backbone alone. On ml-100k
it did not make TIGER or `tiger_cf` better on validation (benchmarks/RESULTS.md), so it is off.

Beyond the paper, `dense_head` (off by default; after LIGER, Yang et al. 2024, which unifies
generative and dense retrieval): the decoder's BOS state h, the state the first code is
predicted from, also scores every item i as (W h) . e_i + b_i over an N_items x D table, and
full-softmax cross-entropy on the target item is added to the loss at `backbone.dense_loss_weight`.
The model then carries its own item distribution, which can steer its beam as SASRec's does in
`tiger_cf` (benchmarks/dense_head.py) at the cost of one (B, D) x (D, N) product per user. On
ml-100k that was not better than the plain backbone's `tiger_cf` on validation (benchmarks/RESULTS.md),
so it is off.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from grc_core.config import ModelConfig

if TYPE_CHECKING:
    from grc_core.sasrec import SASRec




class Attention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not divisible by n_heads {heads}")
        self.h, self.dh, self.p = heads, d // heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.h, self.dh).transpose(1, 2)  # (B, H, S, dh)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)  # (B, S, D) each
        return self.split(k), self.split(v)  # (B, H, S, dh)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = self.split(self.q(x))  # (B, H, S, dh)
        p = self.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, S, dh)
        b, _, s, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(b, s, self.h * self.dh))  # (B, S, D)


class FeedForward(nn.Sequential):
    def __init__(self, d: int, d_ff: int, dropout: float):
        super().__init__(nn.Linear(d, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        k, v = self.attn.keys_values(h)
        x = x + self.drop(self.attn.attend(h, k, v, mask))
        return x + self.drop(self.ff(self.n2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n1, self.n2, self.n3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)


class Memory(NamedTuple):
    """Encoder output with the cross-attention keys/values of every decoder layer, per user."""

    keys: list[torch.Tensor]  # per layer (B, H, T, dh)
    values: list[torch.Tensor]  # per layer (B, H, T, dh)
    mask: torch.Tensor  # (B, 1, 1, T) additive: 0 for real items, -inf for padding


class Batch(NamedTuple):
    history_codes: torch.Tensor  # (B, T, L) int64, padded positions hold 0
    history_attrs: torch.Tensor  # (B, T, A) int64 attribute buckets, 0 for padding/unknown
    history_mask: torch.Tensor  # (B, T) bool, True for real items
    target_codes: torch.Tensor | None = None  # (B, L) int64
    history_items: torch.Tensor | None = None  # (B, T) int64 item ids, padded positions hold 0


class Seq2Seq(nn.Module):
    """Encoder over the user's history; decoder over semantic-ID levels."""

    def __init__(self, cfg: ModelConfig, level_sizes: Sequence[int], attr_sizes: Sequence[int], n_items: int = 0,
                 cf: "SASRec | None" = None):
        super().__init__()
        for flag in ("item_embedding", "dense_head"):
            if getattr(cfg, flag) and n_items < 1:
                raise ValueError(f"{flag} needs the item count, got n_items={n_items}")
        if cfg.cf_token and cf is None:
            raise ValueError("cf_token needs the SASRec whose user state it reads (cf=...)")
        self.cfg, self.level_sizes, self.attr_sizes = cfg, tuple(level_sizes), tuple(attr_sizes)
        d, n_levels = cfg.d_model, len(level_sizes)
        self.enc_codes = nn.ModuleList(nn.Embedding(v, d) for v in level_sizes)
        self.enc_attrs = nn.ModuleList(nn.Embedding(v, d) for v in attr_sizes)
        self.enc_items = nn.Embedding(n_items, d) if cfg.item_embedding else None
        self.enc_pos = nn.Embedding(cfg.max_history * (n_levels if cfg.layout == "code" else 1), d)
        self.enc_level = nn.Embedding(n_levels, d) if cfg.layout == "code" else None
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.enc_norm = nn.LayerNorm(d)
        self.bos = nn.Parameter(torch.zeros(d))
        self.dec_codes = nn.ModuleList(nn.Embedding(v, d) for v in level_sizes)
        self.dec_pos = nn.Embedding(64, d)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.dec_norm = nn.LayerNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, v) for v in level_sizes)
        self.dense_proj = nn.Linear(d, d) if cfg.dense_head else None
        self.dense_items = nn.Embedding(n_items, d) if cfg.dense_head else None
        self.dense_bias = nn.Parameter(torch.zeros(n_items)) if cfg.dense_head else None
        self.apply(_init)
        nn.init.normal_(self.bos, std=0.02)
        self.cf = self.cf_proj = None
        if cfg.cf_token:  # after `_init`, which must not touch the trained SASRec
            self.cf = cf.requires_grad_(False).eval()
            self.cf_proj = nn.Linear(cf.cfg.hidden, d)
            _init(self.cf_proj)

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def n_items(self) -> int:
        """Rows of the item tables (0 without `item_embedding` and `dense_head`)."""
        table = self.enc_items if self.enc_items is not None else self.dense_items
        return 0 if table is None else table.num_embeddings

    def architecture(self) -> dict:
        """What `from_architecture` rebuilds this model from (a saved `config.json`'s fields)."""
        arch = {"model": asdict(self.cfg), "level_sizes": list(self.level_sizes),
                "attr_sizes": list(self.attr_sizes), "n_items": self.n_items}
        if self.cf is not None:
            arch["cf_sasrec"] = self.cf.architecture()
        return arch

    @classmethod
    def from_architecture(cls, arch: dict) -> "Seq2Seq":
        """An untrained model of the architecture a `config.json` records (`architecture`'s fields;
        `n_items` is absent from backbones saved before the item embedding, which have none); with
        `cf_token`, an untrained SASRec of `cf_sasrec`'s architecture, which the weights fill."""
        cf = None
        if arch.get("cf_sasrec"):
            from grc_core.sasrec import SASRec  # here: grc_core.sasrec imports grc_core.train, which imports this

            cf = SASRec.from_architecture(arch["cf_sasrec"])
        return cls(ModelConfig(**arch["model"]), arch["level_sizes"], arch["attr_sizes"], arch.get("n_items", 0), cf)

    def train(self, mode: bool = True) -> "Seq2Seq":
        super().train(mode)
        if self.cf is not None:  # frozen: its dropout stays off while TIGER trains
            self.cf.eval()
        return self

    def cf_state(self, batch: Batch) -> torch.Tensor:
        """(B, H) SASRec's hidden state after each history (end-aligned rows, as `to_batch` makes them)."""
        if batch.history_items is None:
            raise ValueError("this backbone reads SASRec's user state (cf_token), but the batch has no "
                             "history_items: build it with grc_core.data.to_batch")
        width = self.cf.cfg.max_len
        seqs = ((batch.history_items + 1) * batch.history_mask)[:, -width:]  # SASRec's shifted ids, 0 = padding
        with torch.no_grad():
            return self.cf(seqs)[:, -1]

    def item_extra(self, batch: Batch, like: torch.Tensor) -> torch.Tensor:
        """(B, T, D): each history item's attribute-bucket embeddings plus, with `item_embedding`,
        its own embedding (padding rows hold item 0; the encoder masks them)."""
        x = sum((emb(batch.history_attrs[..., j]) for j, emb in enumerate(self.enc_attrs)), torch.zeros_like(like))
        if self.enc_items is not None:
            if batch.history_items is None:
                raise ValueError("this backbone embeds history items (item_embedding), but the batch has no "
                                 "history_items: build it with grc_core.data.to_batch")
            x = x + self.enc_items(batch.history_items)
        return x

    def embed_history(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        codes, keep = batch.history_codes, batch.history_mask
        b, t, n_levels = codes.shape
        if t > self.cfg.max_history:
            raise ValueError(f"histories of {t} items, but this backbone was built for at most {self.cfg.max_history} "
                             f"(its config.json's max_history): train it again at this data.max_history, or set "
                             f"data.max_history={self.cfg.max_history}")
        if self.cfg.layout == "item":
            x = sum(emb(codes[..., j]) for j, emb in enumerate(self.enc_codes))  # (B, T, D)
            x = x + self.item_extra(batch, x)
            return x + self.enc_pos.weight[self.cfg.max_history - t:], keep
        per_code = torch.stack([emb(codes[..., j]) for j, emb in enumerate(self.enc_codes)], 2)  # (B, T, L, D)
        item_extra = self.item_extra(batch, per_code[:, :, 0])  # (B, T, D)
        per_code = per_code + item_extra[:, :, None] + self.enc_level.weight  # (B, T, L, D)
        pos = self.enc_pos.weight[(self.cfg.max_history - t) * n_levels:]  # (T*L, D)
        x = per_code.reshape(b, t * n_levels, -1) + pos  # (B, T*L, D)
        return x, keep.repeat_interleave(n_levels, dim=1)  # (B, T*L)

    def encode(self, batch: Batch) -> Memory:
        x, keep = self.embed_history(batch)  # (B, S, D), (B, S)
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, float("-inf"))
        mask = mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder:
            x = layer(x, mask)
        if self.cf is not None:
            x = torch.cat([x, self.cf_proj(self.cf_state(batch))[:, None]], 1)  # (B, S+1, D)
            mask = F.pad(mask, (0, 1))  # the user-state position is always visible
        x = self.enc_norm(x)
        keys, values = zip(*(layer.cross_attn.keys_values(x) for layer in self.decoder))
        return Memory(list(keys), list(values), mask)

    def embed_decoder_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """BOS followed by the embeddings of codes (…, n) of levels 0..n-1: (…, n+1, D)."""
        lead = codes.shape[:-1]
        parts = [self.bos.expand(*lead, 1, -1)]
        parts += [self.dec_codes[j](codes[..., j : j + 1]) for j in range(codes.shape[-1])]
        return torch.cat(parts, dim=-2)

    def decode(self, x: torch.Tensor, memory: Memory, self_mask: torch.Tensor | None = None,
               start: int = 0) -> torch.Tensor:
        """Full-sequence decoder (teacher forcing): inputs (B, S, D) -> hidden states (B, S, D).

        `self_mask` is an additive (S, S) mask; None means causal. `start` offsets positions.
        This is `decoder_step` on an empty cache, and the reference the cached steps are tested
        against (tests/grc_core/test_model.py).
        """
        if self_mask is None:
            self_mask = causal_mask(x.shape[1], x.device, x.dtype)
        hidden, _, _ = decoder_step(self, memory, [], [], x, start, self_mask)  # (B, S, D)
        return hidden

    def level_logits(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states (B, >=L, D) at BOS..code L-1 -> logits per level, each (B, V_l)."""
        return [head(hidden[:, j]) for j, head in enumerate(self.heads)]

    def dense_logits(self, bos_hidden: torch.Tensor) -> torch.Tensor:
        """The dense head's item scores from the decoder's BOS state: (..., D) -> (..., N)."""
        if self.dense_items is None:
            raise ValueError("this backbone has no dense head (backbone.model.dense_head: false)")
        return self.dense_proj(bos_hidden) @ self.dense_items.weight.T + self.dense_bias

    def forward(self, batch: Batch, dense: bool = False) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
        """Teacher-forced level logits, each (B, V_l); with `dense`, also the dense head's (B, N) item
        logits from the same BOS state."""
        memory = self.encode(batch)
        x = self.embed_decoder_codes(batch.target_codes[:, :-1])  # (B, L, D)
        hidden = self.decode(x, memory)  # (B, L, D)
        if dense:
            return self.level_logits(hidden), self.dense_logits(hidden[:, 0])
        return self.level_logits(hidden)

    @torch.inference_mode()
    def dense_log_probs(self, batch: Batch) -> torch.Tensor:
        """(B, N) the dense head's log-softmax over the catalog after each history (its BOS state is
        the beam search's first step, `BackboneStepper.begin`)."""
        memory = self.encode(batch)
        x = self.bos.expand(batch.history_codes.shape[0], 1, -1)  # (B, 1, D)
        hidden, _, _ = decoder_step(self, memory, [], [], x, 0)  # (B, 1, D)
        return torch.log_softmax(self.dense_logits(hidden[:, 0]), -1)


def decoder_step(seq: Seq2Seq, memory: Memory, keys: list[torch.Tensor], values: list[torch.Tensor],
                 x: torch.Tensor, pos: int, mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """C new decoder positions on top of a self-attention KV cache, through every decoder layer.

    The one decoder-layer code path: the teacher-forced `Seq2Seq.decode` (lead (B,), empty
    cache), the beam search's `BackboneStepper` (lead (B, W), C = 1), GRC's reflection and
    correction chunks (`grc.reflect_on_cache`, `grc.open_correction`) and GRPO's sampler.

    x (*lead, C, D) inputs at positions pos..pos+C-1, lead = (B,) or (B, W);
    keys/values: per layer (*lead, H, S, dh), the cache of positions 0..S-1, or [] for none;
    mask: additive (C, S+C) self-attention mask over cache and new positions, None: see all.
    Cross-attention: the W*C queries of a user share that user's (B, H, T, dh) memory.
    Returns hidden (*lead, C, D) after the final norm and the caches (*lead, H, S+C, dh).
    """
    lead, c, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    b = lead[0]
    x = x + seq.dec_pos.weight[pos : pos + c]
    new_k, new_v = [], []
    for i, layer in enumerate(seq.decoder):
        att = layer.self_attn
        h = layer.n1(x)  # (*lead, C, D)
        k, v = att.kv(h).chunk(2, dim=-1)  # (*lead, C, D)
        k = k.view(*lead, c, att.h, att.dh).transpose(-3, -2)  # (*lead, H, C, dh)
        v = v.view(*lead, c, att.h, att.dh).transpose(-3, -2)
        if keys:
            k = torch.cat([keys[i], k], dim=-2)  # (*lead, H, S+C, dh)
            v = torch.cat([values[i], v], dim=-2)
        q = att.q(h).view(*lead, c, att.h, att.dh).transpose(-3, -2)  # (*lead, H, C, dh)
        p = att.p if att.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (*lead, H, C, dh)
        x = x + layer.drop(att.o(y.transpose(-3, -2).reshape(*lead, c, d)))  # (*lead, C, D)
        ca = layer.cross_attn
        q = ca.q(layer.n2(x)).view(b, -1, ca.h, ca.dh).transpose(1, 2)  # (B, H, W*C, dh)
        p = ca.p if ca.training else 0.0
        y = F.scaled_dot_product_attention(q, memory.keys[i], memory.values[i], attn_mask=memory.mask,
                                           dropout_p=p)  # (B, H, W*C, dh)
        x = x + layer.drop(ca.o(y.transpose(1, 2).reshape(*lead, c, d)))  # (*lead, C, D)
        x = x + layer.drop(layer.ff(layer.n3(x)))
        new_k.append(k)
        new_v.append(v)
    return seq.dec_norm(x), new_k, new_v


def reference_decode(seq: Seq2Seq, x: torch.Tensor, memory: Memory, self_mask: torch.Tensor | None = None,
                     start: int = 0) -> torch.Tensor:
    """`Seq2Seq.decode` written out: softmax(q k^T / sqrt(dh) + mask) v per head, the whole
    sequence at once, no cache, no fused attention, no dropout. Slow and obvious, for parity tests
    of `decoder_step`. x (B, S, D) -> hidden (B, S, D)."""
    s = x.shape[1]
    mask = causal_mask(s, x.device, x.dtype) if self_mask is None else self_mask  # (S, S)

    def attention(att: Attention, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = q_in.shape
        q = att.q(q_in).view(b, n, att.h, att.dh).transpose(1, 2)  # (B, H, S, dh)
        weights = torch.softmax(q @ k.transpose(-1, -2) / att.dh**0.5 + bias, dim=-1)  # (B, H, S, S')
        return att.o((weights @ v).transpose(1, 2).reshape(b, n, att.h * att.dh))  # (B, S, D)

    x = x + seq.dec_pos.weight[start : start + s]
    for i, layer in enumerate(seq.decoder):
        h = layer.n1(x)
        k, v = layer.self_attn.keys_values(h)  # (B, H, S, dh)
        x = x + attention(layer.self_attn, h, k, v, mask)
        x = x + attention(layer.cross_attn, layer.n2(x), memory.keys[i], memory.values[i], memory.mask)
        x = x + layer.ff(layer.n3(x))
    return seq.dec_norm(x)


def causal_mask(s: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((s, s), float("-inf"), device=device, dtype=dtype).triu(1)  # (S, S)


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def sequence_loss(logits: list[torch.Tensor], target_codes: torch.Tensor,
                  soft_targets: list[torch.Tensor] | None = None, soft_weight: float = 0.0,
                  prior: list[torch.Tensor] | None = None, prior_weight: float = 0.0) -> torch.Tensor:
    """Eq. 1: sum over levels of the cross-entropy of each level's code, averaged over the batch.

    With `soft_targets` (per level (B, V_l) log-probabilities, e.g. `cf_value.level_soft_targets`)
    each level's label is the mixture (1 - soft_weight) * one-hot + soft_weight * q_l.
    With a `prior` (the same shapes; -inf for codes it rules out) the cross-entropy is that of the
    per-level product of experts softmax(logits + prior_weight * prior): the model learns what the
    prior does not say (`cf_value`'s residual backbone, decoded by `beam_search`'s "levelwise" rule).
    """
    if prior is not None and prior_weight != 0.0:
        logits = [lg + prior_weight * q for lg, q in zip(logits, prior)]
    if soft_targets is None or soft_weight == 0.0:
        return sum(F.cross_entropy(lg, target_codes[:, j]) for j, lg in enumerate(logits))
    loss = torch.zeros((), device=logits[0].device)
    for j, (lg, q) in enumerate(zip(logits, soft_targets)):
        hard = F.cross_entropy(lg, target_codes[:, j])
        soft = -(q.exp() * torch.log_softmax(lg, -1)).sum(-1).mean()  # H(q_l, pi_l); exp(-inf) = 0
        loss = loss + (1.0 - soft_weight) * hard + soft_weight * soft
    return loss


class DecodeState(NamedTuple):
    memory: Memory
    keys: list[torch.Tensor]  # per layer (B, W, H, S, dh): self-attention cache of each beam
    values: list[torch.Tensor]
    hidden_len: int  # S, decoder positions consumed


class BackboneStepper:
    """Drives `Seq2Seq` through the beam search's step interface with a KV cache.

    Cross-attention keys/values are computed once per user and shared by all its beams:
    the W beams of a user are W queries against the same (B, H, T, dh) memory.
    """

    def __init__(self, model: Seq2Seq):
        self.model = model

    @torch.inference_mode()
    def begin(self, batch: Batch) -> tuple[torch.Tensor, DecodeState]:
        m = self.model
        memory = m.encode(batch)
        b = batch.history_codes.shape[0]
        x = m.bos.expand(b, 1, -1)  # (B, 1, D)
        hidden, k, v = decoder_step(m, memory, [], [], x[:, :, None], 0)  # (B, 1, 1, D)
        logp = F.log_softmax(m.heads[0](hidden[:, :, 0]), dim=-1)  # (B, 1, V_0)
        return logp, DecodeState(memory, k, v, 1)

    @torch.inference_mode()
    def advance(self, state: DecodeState, parents: torch.Tensor, tokens: torch.Tensor,
                level: int) -> tuple[torch.Tensor, DecodeState]:
        m = self.model
        idx = parents[:, :, None, None, None]  # (B, W, 1, 1, 1)
        keys = [k.gather(1, idx.expand(-1, -1, *k.shape[2:])) for k in state.keys]  # (B, W, H, S, dh)
        values = [v.gather(1, idx.expand(-1, -1, *v.shape[2:])) for v in state.values]
        x = m.dec_codes[level](tokens)  # (B, W, D)
        hidden, k, v = decoder_step(m, state.memory, keys, values, x[:, :, None], state.hidden_len)  # (B, W, 1, D)
        logp = F.log_softmax(m.heads[level + 1](hidden[:, :, 0]), dim=-1)  # (B, W, V_{level+1})
        return logp, DecodeState(state.memory, k, v, state.hidden_len + 1)


def count_flops_per_sample(cfg: ModelConfig, level_sizes: Sequence[int], history: int) -> int:
    """Multiply-adds x 2 of one teacher-forced forward pass (matmuls only), for throughput reports."""
    d, f, n_levels = cfg.d_model, cfg.d_ff, len(level_sizes)
    s_enc = history * (n_levels if cfg.layout == "code" else 1)
    enc = cfg.encoder_layers * s_enc * (4 * d * d + 2 * d * f + 2 * s_enc * d)
    s_dec = n_levels
    dec = cfg.decoder_layers * (s_dec * (6 * d * d + 2 * d * f + 2 * s_dec * d + 2 * s_enc * d) + s_enc * 2 * d * d)
    return 2 * (enc + dec + d * sum(level_sizes))
