"""GRPO over whole generate-reflect-correct episodes (GRC paper Sec. 4.2).

Episode (Sec. 4.2.1), G per user: a draft z0 sampled level by level under the valid-ID
constraint, the K+1 reflection labels sampled in parallel from their slots, and a correction
z1 sampled under the constraint, conditioned on z0 and the sampled labels. The sampling
distribution at a code position is the policy's softmax renormalised over the valid codes
(the trie, and at the last level minus excluded items); log-probabilities of actions are taken
under that same renormalised distribution, in sampling and in training, so the importance
ratio of the first optimisation step on a batch is exactly 1 (a test checks it).

Objective (Eq. 23), per token of the episode (L draft codes, K+1 labels, L corrected codes):
the clipped surrogate min(rho A, clip(rho, 1-eps, 1+eps) A) with rho = pi_theta / pi_old and the
episode's group-relative advantage A (Eq. 22, `rewards.group_advantages`), minus beta * KL to
the frozen SFT policy, estimated per token with k3 = exp(d) - d - 1, d = log pi_ref - log pi_theta
(the GRPO paper's unbiased estimator); means over tokens, then over episodes. Several
optimisation steps per batch of episodes (`ppo_epochs`), each against pi_old = the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from grc_core.grc import GRCModel, open_correction, reflect_on_cache, template_mask
from grc_core.model import Batch, BackboneStepper, Memory
from grc_core.trie import PrefixTrie

NEG_INF = float("-inf")


@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8  # G episodes per user
    clip_eps: float = 0.15  # epsilon of the clipped surrogate
    kl_beta: float = 0.03  # beta of the KL penalty to the SFT policy
    ppo_epochs: int = 2  # optimisation steps per batch of episodes
    temperature: float = 1.0  # sampling temperature of every segment
    advantage: str = "zscore"  # zscore | rank (Eq. 22)


class Episodes(NamedTuple):
    draft: torch.Tensor  # (N, L) sampled draft codes, N = users x G (user-major)
    reflection: torch.Tensor  # (N, K+1) sampled labels: r_loc in 1..L+1, then r_sem in {0, 1}
    corrected: torch.Tensor  # (N, L) sampled corrected codes
    logp: torch.Tensor  # (N, 2L+K+1) log-prob of each action under the sampler
    draft_items: torch.Tensor  # (N,) item of the draft
    corrected_items: torch.Tensor  # (N,) item of the correction


def _sample(logits: torch.Tensor, allowed: torch.Tensor, temperature: float,
            gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from softmax(logits / T) renormalised over `allowed`: (tokens, their log-probs)."""
    logp = F.log_softmax((logits / temperature).masked_fill(~allowed, NEG_INF), dim=-1)  # (..., V)
    flat = logp.reshape(-1, logp.shape[-1]).exp()
    tok = torch.multinomial(flat, 1, generator=gen).view(logp.shape[:-1])  # (...)
    return tok, logp.gather(-1, tok[..., None])[..., 0]


def _allowed(trie: PrefixTrie, level: int, nodes: torch.Tensor, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid codes (…, V_l) at `level` for trie nodes (…), and the child table rows."""
    child = trie.child[level][nodes]  # (…, V_l)
    ok = child >= 0
    if exclude is not None and level == trie.num_levels - 1:
        b = exclude.shape[0]
        allowed = ok & ~exclude.gather(1, child.clamp_min(0).reshape(b, -1)).view_as(child)
        # A prefix whose every item is excluded: sampling cannot back up, so that row keeps them.
        ok = torch.where(allowed.any(-1, keepdim=True), allowed, ok)
    return ok, child


@torch.no_grad()
def sample_episodes(model: GRCModel, batch: Batch, trie: PrefixTrie, cfg: GRPOConfig,
                    gen: torch.Generator | None = None, exclude: torch.Tensor | None = None) -> Episodes:
    """G episodes for each of the B users of `batch` with the KV cache (no teacher forcing)."""
    seq, t = model.seq, model.template
    n_levels, g = t.num_levels, cfg.group_size
    stepper = BackboneStepper(seq)
    memory = seq.encode(batch)
    b = batch.history_codes.shape[0]
    x = seq.bos.expand(b, g, -1)  # (B, G, D)
    # Draft: level by level, G independent samples per user (each beam its own parent).
    hidden, keys, values = stepper._step(memory, [], [], x, 0)
    nodes = torch.zeros(b, g, dtype=torch.long, device=x.device)  # (B, G)
    codes, logps = [], []
    for level in range(n_levels):
        if level > 0:
            hidden, keys, values = stepper._step(memory, keys, values, seq.dec_codes[level - 1](codes[-1]), level)
        ok, child = _allowed(trie, level, nodes, exclude)
        tok, lp = _sample(seq.heads[level](hidden), ok, cfg.temperature, gen)  # (B, G)
        nodes = child.gather(-1, tok[..., None])[..., 0]
        codes.append(tok)
        logps.append(lp)
    draft_items = nodes  # (B, G) item index after the last level
    draft = torch.stack(codes, -1)  # (B, G, L)
    # Reflection: one chunk [d_L, EOF1, slots] on top of the draft's cache, labels sampled in parallel.
    slots, keys, values = reflect_on_cache(model, memory, keys, values, draft)
    labels = []
    for j, lg in enumerate(model.reflection_logits(slots)):
        tok, lp = _sample(lg, torch.ones_like(lg, dtype=torch.bool), cfg.temperature, gen)
        labels.append(tok + (1 if j == 0 else 0))
        logps.append(lp)
    reflection = torch.stack(labels, -1) if labels else torch.zeros(b, g, 0, dtype=torch.long, device=draft.device)
    r_loc = reflection[..., 0] if t.reflect else None
    r_sem = reflection[..., 1:] if t.reflect else None
    hidden, keys, values = open_correction(model, memory, keys, values, r_loc, r_sem, (b, g))
    pos = t.eof2
    nodes = torch.zeros(b, g, dtype=torch.long, device=draft.device)
    codes = []
    for level in range(n_levels):
        if level > 0:
            hidden, keys, values = stepper._step(memory, keys, values, seq.dec_codes[level - 1](codes[-1]),
                                                 pos + level)
        ok, child = _allowed(trie, level, nodes, exclude)
        tok, lp = _sample(seq.heads[level](hidden), ok, cfg.temperature, gen)
        nodes = child.gather(-1, tok[..., None])[..., 0]
        codes.append(tok)
        logps.append(lp)
    corrected = torch.stack(codes, -1)  # (B, G, L)
    flat = lambda z: z.reshape(b * g, *z.shape[2:])  # noqa: E731
    return Episodes(flat(draft), flat(reflection), flat(corrected), flat(torch.stack(logps, -1)),
                    flat(draft_items), flat(nodes))


def _path_allowed(trie: PrefixTrie, codes: torch.Tensor, exclude: torch.Tensor | None) -> list[torch.Tensor]:
    """Valid-code masks (N, V_l) along each sequence's own trie path."""
    nodes = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
    out = []
    for level in range(trie.num_levels):
        ok, child = _allowed(trie, level, nodes, exclude)
        out.append(ok)
        nodes = child.gather(1, codes[:, level : level + 1])[:, 0].clamp_min(0)
    return out


def episode_logprobs(model: GRCModel, memory: Memory, ep: Episodes, trie: PrefixTrie, temperature: float = 1.0,
                     exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of every action of the episodes, (N, 2L+K+1), and per-token entropy.

    `memory` rows align with the episodes (expand per user with `expand_memory`).
    """
    t, seq = model.template, model.seq
    r_loc = ep.reflection[:, 0] if t.reflect else torch.ones_like(ep.draft[:, 0])
    r_sem = ep.reflection[:, 1:] if t.reflect else ep.draft[:, :0]
    x = model.template_inputs(ep.draft, r_loc, r_sem, ep.corrected)[:, :-1]  # (N, S-1, D)
    mask = template_mask(t, x.device, x.dtype)[:-1, :-1]
    h = seq.decode(x, memory, mask)
    out, ent = [], []

    def take(logits: torch.Tensor, ok: torch.Tensor, tok: torch.Tensor) -> None:
        lp = F.log_softmax((logits / temperature).masked_fill(~ok, NEG_INF), dim=-1)  # (N, V)
        out.append(lp.gather(1, tok[:, None])[:, 0])
        p = lp.exp()
        ent.append(-(p * lp.masked_fill(~ok, 0.0)).sum(-1))

    for lv, ok in enumerate(_path_allowed(trie, ep.draft, exclude)):
        take(seq.heads[lv](h[:, lv]), ok, ep.draft[:, lv])
    for j, lg in enumerate(model.reflection_logits(h[:, t.first_slot : t.eof2])):
        take(lg, torch.ones_like(lg, dtype=torch.bool), ep.reflection[:, j] - (1 if j == 0 else 0))
    for lv, ok in enumerate(_path_allowed(trie, ep.corrected, exclude)):
        take(seq.heads[lv](h[:, t.eof2 + lv]), ok, ep.corrected[:, lv])
    return torch.stack(out, 1), torch.stack(ent, 1)


def grpo_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              cfg: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 23 per token: -(clipped surrogate - beta * k3 KL), mean over tokens then episodes."""
    ratio = (new_logp - old_logp).exp()  # (N, T)
    adv = advantages[:, None]  # (N, 1)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)  # (N, T)
    d = ref_logp - new_logp
    kl = d.exp() - d - 1  # (N, T) k3 estimator, >= 0
    loss = -(surr - cfg.kl_beta * kl).mean(1).mean()
    clipped = ((ratio - 1).abs() > cfg.clip_eps).float().mean()
    return loss, {"kl": float(kl.mean().detach()), "clip_frac": float(clipped), "ratio_mean": float(ratio.mean().detach())}
