"""Sibling-GRPO and the V-STAR training loop (V-STAR paper, Sec. 4.3-4.4, Eqs. 15-19).

The candidate set C(x) of a user (from VED, grc_core/ved.py, or from a beam for the plain-GRPO
control) is a prefix tree. At depth l, the candidates sharing a parent prefix h form the sibling
group G(h); their distinct l-th codes are the sibling nodes S(h).

    Eq. 17  node_rewards          R_bar(h, v): mean reward of the candidates through child v
    Eq. 18  sibling_advantages    A_node = (R_bar - mu_h) / (sigma_h + eps) over the nodes of S(h),
                                  on the branching token y_l of each candidate; 0 where |S(h)| < 2
            sequence_advantages   plain GRPO: (R - mean) / (std + eps) over the user's candidates
    Eq. 19  vstar_loss            (1 - eta) GRPO + eta Sibling-GRPO, clipped surrogates, + beta k3 KL
            exact_match_reward    R = 1[y = y*] + dense_weight * sum_l r_l (r_l: grc_core/value.py Eq. 4)

A group whose rewards are all equal (the all-zero group of exact-match rewards) gives both
advantages 0: no gradient but the KL's, and no NaN.

`run_vstar` alternates: candidates for a batch of training users under the current policy
(and value), rewards, a TD(0) step of the value head on those candidates (Sec. 4.4's
self-evolving loop), then `ppo_epochs` policy steps. It starts with `value.steps` value-only
steps on candidates sampled from the frozen policy, so VED does not steer by an untrained head.

Departures from the paper and its code:
- Per-token means (their code's `has_adv` mean) rather than Eq. 19's per-node sum over |C(x)|:
  a node through which several candidates pass weighs as many tokens.
- Clipped surrogate with pi_old = the policy that built the candidates (their code uses the
  unclipped exp(logp - logp.detach()) of a single step); log-probs are under the policy
  renormalised over the trie's valid codes, as in grc_core/grpo.py.
- The KL is to the frozen backbone (the RL start), k3, on every candidate token.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from grc_core.beam_search import beam_search
from grc_core.config import SiblingConfig, ValueConfig, VEDConfig, VStarLoopConfig
from grc_core.data import Instances, ItemTable, to_batch
from grc_core.grc import expand_memory
from grc_core.grpo import _path_allowed
from grc_core.model import BackboneStepper, Batch, Seq2Seq
from grc_core.rewards import group_advantages
from grc_core.train import Checkpoints, TrainerState
from grc_core.trie import PrefixTrie
from grc_core.value import (Prefixes, ValueHead, candidate_values, sample_candidates, semantic_step_rewards,
                            td_targets, value_loss)
from grc_core.ved import LearnedValue, ved_decode


def node_rewards(codes: torch.Tensor, rewards: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Eq. 17: R_bar of the depth-l node each candidate passes through, (B, C, L).
    codes (B, C, L), rewards (B, C), live (B, C); padding gets 0."""
    same = (codes[:, :, None, :] == codes[:, None, :, :]).int().cumprod(-1).bool()  # (B, C, C, L) same y<=l
    same &= live[:, None, :, None] & live[:, :, None, None]
    w = same.to(rewards.dtype)
    return torch.einsum("bcdl,bd->bcl", w, rewards) / w.sum(2).clamp_min(1.0)  # (B, C, L)


def sibling_advantages(codes: torch.Tensor, rewards: torch.Tensor, live: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 18 on every candidate's token at every depth: (advantages (B, C, L), branching (B, C, L) bool).

    mu_h and sigma_h (population) are over the distinct sibling nodes under the candidate's parent
    prefix, each node once: a candidate c' in G(h) weighs 1 / |G(h, y'_l)|. `branching` marks the
    tokens whose parent has at least two sibling nodes; elsewhere the advantage is 0.
    """
    r_bar = node_rewards(codes, rewards, live)  # (B, C, L)
    eq = (codes[:, :, None, :] == codes[:, None, :, :]).int()  # (B, C, C, L)
    both = (live[:, None, :] & live[:, :, None])[..., None]  # (B, C, C, 1)
    child = eq.cumprod(-1).bool() & both  # (B, C, C, L) same prefix through level l
    parent = torch.cat([torch.ones_like(eq[..., :1]), eq[..., :-1].cumprod(-1)], -1).bool() & both  # same y<l
    n_child = child.sum(2).clamp_min(1).to(rewards.dtype)  # (B, C, L) |G(h, v)| of each candidate's node
    weight = parent.to(rewards.dtype) / n_child[:, None, :, :]  # (B, C, C', L) 1 / |G(h, v')| for c' in G(h)
    nodes = weight.sum(2)  # (B, C, L) |S(h)|
    mu = torch.einsum("bcdl,bdl->bcl", weight, r_bar) / nodes.clamp_min(1e-9)
    dev = r_bar[:, None, :, :] - mu[:, :, None, :]  # (B, C, C', L) R_bar(v') - mu_h
    var = (weight * dev * dev).sum(2) / nodes.clamp_min(1e-9)
    branching = (nodes > 1.5) & live[..., None]
    adv = torch.where(branching, (r_bar - mu) / (var.sqrt() + eps), torch.zeros_like(r_bar))
    return adv, branching


def sequence_advantages(rewards: torch.Tensor, live: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain GRPO: z-scored rewards among each user's live candidates (rewards.group_advantages), (B, C)."""
    b, c = rewards.shape
    groups = torch.arange(b, device=rewards.device)[:, None].expand(b, c)
    out = torch.zeros_like(rewards)
    if bool(live.any()):
        out[live] = group_advantages(rewards[live], groups[live], "zscore", eps)
    return out


def exact_match_reward(items: torch.Tensor, target: torch.Tensor, step_rewards: torch.Tensor,
                       dense_weight: float) -> torch.Tensor:
    """R(x, y) = 1[y = y*] + dense_weight * sum_l r_l: items (B, C), target (B,), step rewards (B, C, L) -> (B, C)."""
    hit = (items == target[:, None]).to(step_rewards.dtype)
    return hit + dense_weight * step_rewards.sum(-1)


def candidate_logprobs(seq: Seq2Seq, memory, codes: torch.Tensor, trie: PrefixTrie,
                       exclude: torch.Tensor | None) -> torch.Tensor:
    """log pi(y_l | x, y<l) of each code, pi renormalised over the valid codes: codes (N, L) -> (N, L).
    `memory` and `exclude` rows align with codes."""
    hidden = seq.decode(seq.embed_decoder_codes(codes[:, :-1]), memory)  # (N, L, D)
    out = []
    for level, ok in enumerate(_path_allowed(trie, codes, exclude)):
        lp = F.log_softmax(seq.heads[level](hidden[:, level]).masked_fill(~ok, float("-inf")), -1)  # (N, V_l)
        out.append(lp.gather(1, codes[:, level : level + 1])[:, 0])
    return torch.stack(out, 1)  # (N, L)


def _clipped(ratio: torch.Tensor, adv: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)


def vstar_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, ref_lp: torch.Tensor, seq_adv: torch.Tensor,
               sib_adv: torch.Tensor, branching: torch.Tensor, live: torch.Tensor,
               cfg: SiblingConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 19 blended with GRPO: (1 - eta) L_GRPO + eta L_sib + beta KL, each a mean over its tokens.
    Log-probs (N, L); seq_adv (N,); sib_adv, branching (N, L); live (N,)."""
    keep = live[:, None].expand_as(new_lp)  # (N, L)
    # A padded candidate's path may hold an invalid code (log-prob -inf): mask by selection, not by
    # multiplication, so that -inf * 0 does not turn the loss into NaN.
    new_lp, old_lp, ref_lp = (torch.where(keep, x, torch.zeros_like(x)) for x in (new_lp, old_lp, ref_lp))
    tokens = keep.to(new_lp.dtype)
    ratio = (new_lp - old_lp).exp()
    grpo = -(_clipped(ratio, seq_adv[:, None], cfg.clip_eps) * tokens).sum() / tokens.sum().clamp_min(1)
    mask = (branching & live[:, None]).to(new_lp.dtype)
    sib = -(_clipped(ratio, sib_adv, cfg.clip_eps) * mask).sum() / mask.sum().clamp_min(1)
    d = ref_lp - new_lp
    kl = ((d.exp() - d - 1) * tokens).sum() / tokens.sum().clamp_min(1)
    loss = (1 - cfg.sibling_weight) * grpo + cfg.sibling_weight * sib + cfg.kl_beta * kl
    return loss, {"loss_grpo": float(grpo.detach()), "loss_sibling": float(sib.detach()), "kl": float(kl.detach()),
                  "branching_tokens": float(mask.sum())}


class VStarModules(nn.Module):
    """The policy and its value head, checkpointed together."""

    def __init__(self, policy: Seq2Seq, value: ValueHead | None):
        super().__init__()
        self.policy, self.value = policy, value


class CandidateSet(NamedTuple):
    codes: torch.Tensor  # (B, C, L)
    items: torch.Tensor  # (B, C), -1 for padding
    live: torch.Tensor  # (B, C) bool
    stats: dict[str, float]


CandidateFn = Callable[[Seq2Seq, ValueHead | None, Batch, torch.Tensor | None, torch.Generator], CandidateSet]


def ved_candidates(trie: PrefixTrie, cfg: VEDConfig) -> CandidateFn:
    """V-STAR's candidate sets: VED under the current policy and learned value."""
    def build(policy, head, batch, exclude, gen) -> CandidateSet:
        res = ved_decode(policy, batch, trie, cfg, LearnedValue(head), exclude, gen)
        live = res.items >= 0
        return CandidateSet(res.codes, res.items, live, {"forward_tokens": float(res.cost.float().mean()),
                                                         "leaf_share": float((res.from_leaf.sum() / live.sum().clamp_min(1)))})
    return build


def beam_candidates(trie: PrefixTrie, width: int) -> CandidateFn:
    """The control's candidate sets: the policy's constrained beam of `width` (MiniOneRec's GRPO)."""
    def build(policy, head, batch, exclude, gen) -> CandidateSet:
        res = beam_search(BackboneStepper(policy), batch, trie, width, exclude=exclude)
        items, codes = res.items.clone(), res.codes.clone()  # out of inference mode, for autograd's indices
        return CandidateSet(codes, items, items >= 0, {})
    return build


def value_step(seq: Seq2Seq, head: ValueHead, batch: Batch, cand: Prefixes, target: torch.Tensor,
               item_emb: torch.Tensor, weights: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The TD(0) loss of the head on one candidate set, and the step rewards (B, C, L)."""
    b, c, _ = cand.codes.shape
    r = semantic_step_rewards(cand, batch.target_codes, item_emb, target, weights)  # (B, C, L)
    with torch.no_grad():
        memory = expand_memory(seq.encode(batch), c)
    v = candidate_values(seq, head, memory, cand.codes.clamp_min(0))  # (B, C, L)
    return value_loss(v, td_targets(r, v.detach(), gamma), cand.live), r


def run_vstar(mods: VStarModules, ref: Seq2Seq, train: Instances, table: ItemTable, trie: PrefixTrie,
              item_emb: torch.Tensor, vcfg: ValueConfig | None, scfg: SiblingConfig, loop: VStarLoopConfig,
              candidates: CandidateFn, validate: Callable[[Seq2Seq], dict[str, float]], ckpt: Checkpoints,
              exclude_mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
              log: Callable[[dict[str, Any]], None] | None = None,
              on_iteration: Callable[[dict[str, Any]], None] | None = None) -> TrainerState:
    """Value pretraining (`vcfg.steps`, skipped without a head) then `loop.iterations` RL iterations
    (module docstring). The best validation Recall@10 of the policy is kept as `best` (the start,
    validated first, is the first best); `last` is written at every validation and resumed from."""
    policy, head = mods.policy, mods.value
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": loop.lr,
               "weight_decay": loop.weight_decay}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr": vcfg.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    state = TrainerState()
    gen = torch.Generator().manual_seed(loop.seed)
    meta = ckpt.resume(mods, opt)
    if meta is not None:
        state = TrainerState(**meta["state"])
        gen.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
    weights = torch.tensor(vcfg.level_weights if vcfg is not None else [1.0] * trie.num_levels,
                           dtype=item_emb.dtype, device=item_emb.device)
    if vcfg is not None and len(vcfg.level_weights) != trie.num_levels:
        raise ValueError(f"vstar.value.level_weights has {len(vcfg.level_weights)} weights for {trie.num_levels} levels")
    gamma = vcfg.gamma if vcfg is not None else 1.0
    pre = vcfg.steps if head is not None else 0
    total = pre + loop.iterations

    def save_last() -> None:
        ckpt.save("last", mods, opt, {"state": asdict(state), "generator": gen.get_state().tolist()})

    def draw(n: int) -> tuple[Instances, Batch, torch.Tensor | None]:
        part = train.select(torch.randint(len(train), (n,), generator=gen))
        exclude = exclude_mask(part.history.to(table.codes.device)) if exclude_mask is not None else None
        return part, to_batch(part, table), exclude

    def start() -> None:
        """The RL start (the backbone, after value pretraining): validated, the first `best`."""
        metrics = validate(policy)
        state.best_metric, state.best_epoch = metrics.get("recall@10", 0.0), 0
        ckpt.save("best", mods, None, {"state": asdict(state)})
        record = {"iteration": state.step, "phase": "start", **{f"valid_{k}": v for k, v in metrics.items()}}
        state.history.append(record)
        if log is not None:
            log(record)
        save_last()

    if pre == 0 and state.step == 0 and not state.history:
        start()
    while state.step < total:
        t0 = time.perf_counter()
        record: dict[str, Any] = {"iteration": state.step + 1}
        if state.step < pre:  # value pretraining on candidates sampled from the frozen policy
            part, batch, exclude = draw(vcfg.users_per_step)
            policy.eval()
            cand = sample_candidates(policy, batch, trie, vcfg.samples, gen, exclude)
            head.train()
            loss, r = value_step(policy, head, batch, cand, part.target.to(table.codes.device), item_emb, weights, gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups[:1]:  # the policy does not move in this phase
                for p in g["params"]:
                    p.grad = None
            opt.step()
            record.update({"phase": "value", "value_loss": float(loss.detach())})
        else:
            part, batch, exclude = draw(loop.users_per_step)
            target = part.target.to(table.codes.device)
            policy.eval()
            if head is not None:
                head.eval()
            cs = candidates(policy, head, batch, exclude, gen)
            b, c, n_levels = cs.codes.shape
            filler = torch.where(cs.live[:, :1, None], cs.codes[:, :1], table.codes[:1][None])  # (B, 1, L) a valid ID
            cand = Prefixes(torch.where(cs.live[..., None], cs.codes, filler), cs.items.clamp_min(0), cs.live)
            r_steps = semantic_step_rewards(cand, batch.target_codes, item_emb, target, weights)  # (B, C, L)
            rewards = exact_match_reward(cs.items, target, r_steps, scfg.dense_weight) * cs.live
            seq_adv = sequence_advantages(rewards, cs.live, scfg.eps)  # (B, C)
            sib_adv, branching = sibling_advantages(cand.codes, rewards, cs.live, scfg.eps)  # (B, C, L)
            flat = lambda x: x.reshape(b * c, *x.shape[2:])  # noqa: E731
            codes = flat(cand.codes)
            excl_rows = exclude.repeat_interleave(c, 0) if exclude is not None else None
            with torch.no_grad():
                old_lp = candidate_logprobs(policy, expand_memory(policy.encode(batch), c), codes, trie, excl_rows)
                ref_lp = candidate_logprobs(ref, expand_memory(ref.encode(batch), c), codes, trie, excl_rows)
            if head is not None:  # the value keeps learning on the candidates it steers
                head.train()
                vloss, _ = value_step(policy, head, batch, cand, target, item_emb, weights, gamma)
                record["value_loss"] = float(vloss.detach())
            else:
                vloss = None
            policy.train()
            info: dict[str, float] = {}
            for epoch in range(scfg.ppo_epochs):
                new_lp = candidate_logprobs(policy, expand_memory(policy.encode(batch), c), codes, trie, excl_rows)
                loss, info = vstar_loss(new_lp, old_lp, ref_lp, flat(seq_adv), flat(sib_adv), flat(branching),
                                        flat(cs.live), scfg)
                if epoch == 0 and vloss is not None:
                    loss = loss + vloss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if loop.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), loop.grad_clip)
                opt.step()
            hits = (cs.items == target[:, None]) & cs.live
            record.update({"phase": "rl", "loss": float(loss.detach()), **info, **cs.stats,
                           "reward_mean": float(rewards[cs.live].mean()), "hit_rate": float(hits.any(1).float().mean()),
                           "zero_groups": float((seq_adv.abs().sum(1) == 0).float().mean())})
        state.step += 1
        record["iteration_s"] = time.perf_counter() - t0
        rl_iter = state.step - pre
        validating = rl_iter > 0 and (rl_iter % loop.eval_every == 0 or state.step == total)
        if validating:
            metrics = validate(policy)
            record.update({f"valid_{k}": v for k, v in metrics.items()})
            if metrics.get("recall@10", 0.0) > state.best_metric:
                state.best_metric, state.best_epoch = metrics["recall@10"], rl_iter
                ckpt.save("best", mods, None, {"state": asdict(state)})
            if log is not None:
                log(record)
        state.history.append(record)
        if on_iteration is not None:
            on_iteration(record)
        if rl_iter == 0:
            start()
        elif validating:
            save_last()
    return state
