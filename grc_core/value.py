"""V-STAR's semantic-aware prefix value model (V-STAR paper, Sec. 4.1, Eqs. 1-5).

The state s_l = (x, y<=l) is the decoder of the TIGER policy after it has read BOS and the codes
y_1..y_l: its hidden state at decoder position l (`prefix_hidden`, one `Seq2Seq.decode` over
BOS + the L codes). `ValueHead` is one pre-LayerNorm Transformer block, causal over the prefix
hidden states h_0..h_l, then an MLP regressor: V_phi(s_l) reads h_0..h_l and nothing later, so
the values of every prefix of a path come from one call, and VED (grc_core/ved.py) can value a
single new node from its ancestors' states.

    Eq. 2  prefix_buckets           C(x; y<=l): the sampled candidates that share the prefix y<=l
    Eq. 3  bucket_embeddings        mean embedding of that bucket
    Eq. 4  semantic_step_rewards    r_l = w_l on the target's prefix, else -w_l (1 - cos(mean emb, e(y*)))
    Eq. 5  td_targets, value_loss   y_l = r_l + gamma V(s_{l+1}) (l < L), r_L; squared error
           discounted_returns       sum_{t>=l} gamma^{t-l} r_t, the realised return V is checked against

Departures from the paper and its code:
- The policy's hidden states are detached: the head learns on the policy's states, the policy
  learns only from its own loss (their head shares the LM's trunk and trains it with value_head_weight).
- Item embeddings are an input (the `embed` stage's text vectors where items have text); the
  paper uses a frozen text encoder, the same thing.
- The root state s_0 is valued too (position 0), though no reward is attached to it; VED's root
  is never ranked against other nodes, so its value is not used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from grc_core.config import ValueConfig
from grc_core.grpo import _allowed, _code_step  # the GRPO sampler's constrained step
from grc_core.model import Batch, Memory, Seq2Seq, causal_mask
from grc_core.trie import PrefixTrie


class ValueHead(nn.Module):
    """One Transformer block over the prefix hidden states, then an MLP: (N, S, D) -> (N, S)."""

    def __init__(self, d_model: int, cfg: ValueConfig):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, cfg.n_heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, d_model))
        self.mlp = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, S, D) at decoder positions 0..S-1 -> V (N, S); V[:, l] depends on positions <= l only."""
        s = hidden.shape[1]
        h = self.n1(hidden)
        y, _ = self.attn(h, h, h, attn_mask=causal_mask(s, h.device, h.dtype), need_weights=False)  # (N, S, D)
        x = hidden + y
        x = x + self.ff(self.n2(x))
        return self.mlp(x)[..., 0]  # (N, S)


def prefix_hidden(seq: Seq2Seq, memory: Memory, codes: torch.Tensor) -> torch.Tensor:
    """Decoder hidden states of the states s_0..s_L of full IDs codes (N, L): (N, L+1, D).

    `memory` rows align with `codes` (expand per user with `grc.expand_memory`). Position l has
    read BOS and y_1..y_l, so it is the state whose value is V(s_l) and whose head predicts y_{l+1}.
    """
    x = seq.embed_decoder_codes(codes)  # (N, L+1, D)
    return seq.decode(x, memory)  # (N, L+1, D)


class Prefixes(NamedTuple):
    """The candidate set C(x) of each user, with what the value targets need."""

    codes: torch.Tensor  # (B, C, L) semantic IDs of the candidates
    items: torch.Tensor  # (B, C) item index
    live: torch.Tensor  # (B, C) bool, False for padding (a user with fewer than C candidates)


def prefix_buckets(codes: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Eq. 2: same[b, c, c', l] is True when live candidates c and c' share the prefix y<=l+1 (levels 0..l).
    codes (B, C, L), live (B, C) -> (B, C, C, L) bool; a candidate is always in its own bucket."""
    eq = codes[:, :, None, :] == codes[:, None, :, :]  # (B, C, C, L)
    same = eq.int().cumprod(-1).bool()  # (B, C, C, L) equal on every level up to l
    return same & live[:, None, :, None] & live[:, :, None, None]


def bucket_embeddings(same: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Eq. 3: the mean embedding of each candidate's bucket at each level.
    same (B, C, C, L), emb (B, C, E) -> (B, C, L, E)."""
    w = same.to(emb.dtype)  # (B, C, C, L)
    total = torch.einsum("bcdl,bde->bcle", w, emb)  # (B, C, L, E)
    return total / w.sum(2).clamp_min(1.0)[..., None]  # (B, C, L, E)


def semantic_step_rewards(cand: Prefixes, target_codes: torch.Tensor, item_emb: torch.Tensor,
                          target_items: torch.Tensor, level_weights: torch.Tensor) -> torch.Tensor:
    """Eq. 4: r_l for every candidate and level, (B, C, L); 0 for padding.

    target_codes (B, L) the target's ID, item_emb (N, E) item embeddings, target_items (B,),
    level_weights (L,) w_l. On the target's prefix r_l = w_l; otherwise
    -w_l (1 - cos(mean embedding of the candidates sharing y<=l, e(y*))).
    """
    codes, live = cand.codes, cand.live
    if level_weights.shape[0] != codes.shape[-1]:
        raise ValueError(f"semantic_step_rewards: {level_weights.shape[0]} level weights for {codes.shape[-1]} levels")
    on_target = (codes == target_codes[:, None, :]).int().cumprod(-1).bool()  # (B, C, L)
    mean = bucket_embeddings(prefix_buckets(codes, live), item_emb[cand.items.clamp_min(0)])  # (B, C, L, E)
    cos = F.cosine_similarity(mean, item_emb[target_items][:, None, None, :], dim=-1)  # (B, C, L)
    w = level_weights.to(cos.dtype)
    r = torch.where(on_target, w, -w * (1.0 - cos))  # (B, C, L)
    return r * live[..., None]


def td_targets(rewards: torch.Tensor, next_values: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 5: y_l = r_l + gamma V(s_{l+1}) for l < L, y_L = r_L.
    rewards (..., L) r_1..r_L; next_values (..., L) V(s_1)..V(s_L) (detached) -> (..., L)."""
    bootstrap = torch.cat([next_values[..., 1:], torch.zeros_like(next_values[..., :1])], -1)  # (..., L) V(s_{l+1}), 0 after L
    return rewards + gamma * bootstrap


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_l = sum_{t >= l} gamma^(t-l) r_t: (..., L) -> (..., L), what V(s_l) estimates (Eq. 1)."""
    out = torch.zeros_like(rewards)
    acc = torch.zeros_like(rewards[..., 0])
    for level in range(rewards.shape[-1] - 1, -1, -1):
        acc = rewards[..., level] + gamma * acc
        out[..., level] = acc
    return out


def value_loss(values: torch.Tensor, targets: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Eq. 5: mean squared error of V(s_1..s_L) (B, C, L) against the TD targets, over live candidates."""
    err = (values - targets.detach()) ** 2 * live[..., None]  # (B, C, L)
    return err.sum() / (live.sum() * values.shape[-1]).clamp_min(1)


def candidate_values(seq: Seq2Seq, head: ValueHead, memory: Memory, codes: torch.Tensor) -> torch.Tensor:
    """V(s_1)..V(s_L) of each candidate: memory rows (B*C) aligned with codes (B, C, L) -> (B, C, L).
    The policy's states are detached (this module's docstring)."""
    b, c, n_levels = codes.shape
    with torch.no_grad():
        hidden = prefix_hidden(seq, memory, codes.reshape(b * c, n_levels))  # (B*C, L+1, D)
    return head(hidden)[:, 1:].view(b, c, n_levels)  # (B, C, L)


@torch.no_grad()
def sample_candidates(seq: Seq2Seq, batch: Batch, trie: PrefixTrie, n: int, gen: torch.Generator | None,
                      exclude: torch.Tensor | None = None) -> Prefixes:
    """C(x) = D(pi, x): n IDs per user sampled level by level from the policy renormalised over the
    trie's valid codes (and, at the last level, the items not excluded). Duplicates are dropped
    (padding), since a bucket counts items. -> Prefixes with C = n."""
    memory = seq.encode(batch)
    b = batch.history_codes.shape[0]
    hidden, keys, values = _code_step(seq, memory, [], [], seq.bos.expand(b, n, -1), 0)  # (B, n, D)
    nodes = torch.zeros(b, n, dtype=torch.long, device=hidden.device)  # (B, n)
    codes = []
    for level in range(trie.num_levels):
        if level > 0:
            hidden, keys, values = _code_step(seq, memory, keys, values, seq.dec_codes[level - 1](codes[-1]), level)
        ok, child = _allowed(trie, level, nodes, exclude)  # (B, n, V_l)
        logp = F.log_softmax(seq.heads[level](hidden).masked_fill(~ok, float("-inf")), -1)  # (B, n, V_l)
        tok = torch.multinomial(logp.exp().reshape(b * n, -1), 1, generator=gen).view(b, n)  # (B, n)
        nodes = child.gather(-1, tok[..., None])[..., 0]
        codes.append(tok)
    items = nodes  # (B, n)
    first = torch.ones_like(items, dtype=torch.bool)
    for j in range(1, n):  # keep the first copy of each item
        first[:, j] = ~(items[:, :j] == items[:, j : j + 1]).any(1)
    if exclude is not None:
        first &= ~exclude.gather(1, items)
    return Prefixes(torch.stack(codes, -1), items, first)
