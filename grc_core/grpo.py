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

Credit of the draft tokens (`draft_advantage`): "episode" (the paper) gives every token the
advantage of the whole episode's reward R. Since R_delta (Eq. 21) and R_loc-cor (Eq. 18) pay for
every draft error the correction repairs, and beta_cor = 2.2 outweighs the draft's own hits in
R_task, a worse draft can raise R: on instruments the policy learned to sandbag its drafts after
~200 iterations (benchmarks/RESULTS.md). "task" credits the L draft tokens with the group-relative
advantage of R_task alone (Eq. 15: the draft's hits and the corrected hits, which no worse draft
improves), and the reflection and correction tokens with that of R; the correction rewards then
reach only the tokens that earn them.

`run_grpo` is the training loop (rollouts, rewards, advantages, updates, validation, resumable
checkpoints), shared by the `grpo` stage (tasks/grpo.py) and by runs on other workers.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from grc_core import distributed
from grc_core.config import GRPOConfig, LoopConfig, RewardConfig
from grc_core.data import Instances, ItemTable, to_batch
from grc_core.grc import GRCModel, expand_memory, open_correction, reflect_on_cache, template_mask
from grc_core.model import Batch, Memory, decoder_step
from grc_core.rewards import first_divergence, group_advantages, grc_rewards
from grc_core.train import Checkpoints, TrainerState, make_optimizer
from grc_core.trie import PrefixTrie

NEG_INF = float("-inf")




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
    child = trie.children(level, nodes)  # (…, V_l)
    ok = child >= 0
    if exclude is not None and level == trie.num_levels - 1:
        b = exclude.shape[0]
        allowed = ok & ~exclude.gather(1, child.clamp_min(0).reshape(b, -1)).view_as(child)
        # A prefix whose every item is excluded: sampling cannot back up, so that row keeps them.
        ok = torch.where(allowed.any(-1, keepdim=True), allowed, ok)
    return ok, child


def _code_step(seq, memory: Memory, keys: list[torch.Tensor], values: list[torch.Tensor], x: torch.Tensor,
               pos: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One cached decoder position for the (B, G) episodes: x (B, G, D) -> hidden (B, G, D) and the caches."""
    hidden, keys, values = decoder_step(seq, memory, keys, values, x[:, :, None], pos)  # (B, G, 1, D)
    return hidden[:, :, 0], keys, values


@torch.no_grad()
def sample_episodes(model: GRCModel, batch: Batch, trie: PrefixTrie, cfg: GRPOConfig,
                    gen: torch.Generator | None = None, exclude: torch.Tensor | None = None) -> Episodes:
    """G episodes for each of the B users of `batch` with the KV cache (no teacher forcing)."""
    seq, t = model.seq, model.template
    n_levels, g = t.num_levels, cfg.group_size
    memory = seq.encode(batch)
    b = batch.history_codes.shape[0]
    x = seq.bos.expand(b, g, -1)  # (B, G, D)
    # Draft: level by level, G independent samples per user (each beam its own parent).
    hidden, keys, values = _code_step(seq, memory, [], [], x, 0)
    nodes = torch.zeros(b, g, dtype=torch.long, device=x.device)  # (B, G)
    codes, logps = [], []
    for level in range(n_levels):
        if level > 0:
            hidden, keys, values = _code_step(seq, memory, keys, values, seq.dec_codes[level - 1](codes[-1]), level)
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
            hidden, keys, values = _code_step(seq, memory, keys, values, seq.dec_codes[level - 1](codes[-1]),
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
    """Eq. 23 per token: -(clipped surrogate - beta * k3 KL), mean over tokens then episodes.

    `advantages`: (N,) one per episode, or (N, T) one per token (see `draft_advantage`).
    """
    ratio = (new_logp - old_logp).exp()  # (N, T)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (N, 1) per episode or (N, T) per token
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)  # (N, T)
    d = ref_logp - new_logp
    kl = d.exp() - d - 1  # (N, T) k3 estimator, >= 0
    loss = -(surr - cfg.kl_beta * kl).mean(1).mean()
    clipped = ((ratio - 1).abs() > cfg.clip_eps).float().mean()
    return loss, {"kl": float(kl.mean().detach()), "clip_frac": float(clipped), "ratio_mean": float(ratio.mean().detach())}




def token_advantages(rewards: dict[str, torch.Tensor], groups: torch.Tensor, n_levels: int, n_tokens: int,
                     mode: str, draft_advantage: str) -> torch.Tensor:
    """(N,) episode advantages, or (N, T) with the L draft tokens credited with R_task's advantage."""
    adv = group_advantages(rewards["total"], groups, mode)  # (N,)
    if draft_advantage == "episode":
        return adv
    out = adv[:, None].repeat(1, n_tokens)  # (N, T)
    out[:, :n_levels] = group_advantages(rewards["task"], groups, mode)[:, None]
    return out


def run_grpo(policy: GRCModel, ref: GRCModel, train: Instances, table: ItemTable, trie: PrefixTrie,
             cfg: GRPOConfig, rcfg: RewardConfig, loop: LoopConfig, validate: Callable[[GRCModel], dict[str, float]],
             ckpt: Checkpoints, exclude_mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
             log: Callable[[dict[str, Any]], None] | None = None,
             on_iteration: Callable[[dict[str, Any]], None] | None = None) -> TrainerState:
    """GRPO from the SFT `policy` (frozen copy `ref`) for `loop.iterations`; the best validation is kept.

    Each iteration draws `users_per_step` training instances from a seeded stream, samples G
    episodes per user, scores them (`grc_rewards` under `rcfg`), and takes `cfg.ppo_epochs` steps
    on the clipped surrogate with the KL penalty. `validate(policy)` returns metrics with
    "recall@10" (the SFT start is validated first and is the first "best"). `exclude_mask(history)`
    gives the (B, N_items) items never sampled (a user's history), or None.
    Checkpoints (through `ckpt`): `last` (weights, optimizer, generator states, log) at every
    validation, `best`; a run resumes from `last` when `ckpt` has one and gives the same result.
    Under torchrun every rank samples the same episodes and computes the loss of its share of the
    users (tasks/grpo.py); rank 0 validates and writes checkpoints.
    """
    device = table.codes.device
    opt = make_optimizer(policy, loop)  # reads loop.lr and loop.weight_decay
    rank, world = distributed.rank_world()
    trainer = distributed.wrap_for_loss(policy)
    state, gen_states = TrainerState(), None
    meta = ckpt.resume(policy, opt)
    if meta is not None:
        state = TrainerState(**meta["state"])
        gen_states = meta["generator"], meta.get("sample_generator")
    gen = torch.Generator().manual_seed(loop.seed)  # the instance stream (CPU)
    # Sampling runs where the model is; on CPU it shares the stream's generator (as it always has).
    sample_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(loop.seed)
    if gen_states is not None:
        gen.set_state(torch.tensor(gen_states[0], dtype=torch.uint8))
        if sample_gen is not gen and gen_states[1] is not None:
            sample_gen.set_state(torch.tensor(gen_states[1], dtype=torch.uint8))

    def save_last() -> None:
        ckpt.save("last", policy, opt, {"state": asdict(state), "generator": gen.get_state().tolist(),
                                        "sample_generator": None if sample_gen is gen else sample_gen.get_state().tolist()})

    if state.step == 0 and not state.history:  # the SFT starting point, for the log and as the first "best"
        metrics = validate(policy) if rank == 0 else {}
        state.best_metric = distributed.broadcast_float(metrics.get("recall@10", 0.0))
        state.best_epoch = 0
        if rank == 0:
            ckpt.save("best", policy, None, {"state": asdict(state)})
        state.history.append({"iteration": 0, **{f"valid_{k}": v for k, v in metrics.items()}})
    g, n_levels = cfg.group_size, policy.template.num_levels
    while state.step < loop.iterations:
        t_iter = time.perf_counter()
        idx = torch.randint(len(train), (loop.users_per_step,), generator=gen)
        part = train.select(idx)
        batch = to_batch(part, table)
        exclude = exclude_mask(part.history.to(device)) if exclude_mask is not None else None
        policy.eval()
        ep = sample_episodes(policy, batch, trie, cfg, sample_gen, exclude)
        excl_rows = exclude.repeat_interleave(g, 0) if exclude is not None else None
        tgt = batch.target_codes.repeat_interleave(g, 0)  # (N, L)
        tgt_items = part.target.to(device).repeat_interleave(g, 0)
        rewards = grc_rewards(ep.draft, ep.corrected, tgt, ep.reflection[:, 0], ep.reflection[:, 1:],
                              table.attrs[ep.draft_items], table.attrs[ep.corrected_items], table.attrs[tgt_items], rcfg)
        groups = torch.arange(loop.users_per_step, device=device).repeat_interleave(g)
        adv = token_advantages(rewards, groups, n_levels, ep.logp.shape[1], cfg.advantage, loop.draft_advantage)
        # This rank's users (all of them on one process) and their episodes (user-major rows).
        mine = torch.arange(rank, loop.users_per_step, world, device=device)  # (b_r,)
        rows = (mine[:, None] * g + torch.arange(g, device=device)).reshape(-1)  # (b_r * G,)
        sub_batch = to_batch(part.select(mine.cpu()), table)
        sub_ep = Episodes(*(x[rows] for x in ep))
        sub_excl = excl_rows[rows] if excl_rows is not None else None
        share = len(rows) * world / len(ep.draft)  # weight: the DDP average is then the mean over all episodes
        with torch.no_grad():
            ref_lp, _ = episode_logprobs(ref, expand_memory(ref.seq.encode(sub_batch), g), sub_ep, trie,
                                         cfg.temperature, sub_excl)
        policy.train()
        out: dict = {}

        def loss_fn(m, _):
            lp, ent = episode_logprobs(m, expand_memory(m.seq.encode(sub_batch), g), sub_ep, trie, cfg.temperature,
                                       sub_excl)
            loss, out["info"] = grpo_loss(lp, sub_ep.logp, ref_lp, adv[rows], cfg)
            out["ent"] = ent
            return loss * share

        for _ in range(cfg.ppo_epochs):
            loss = trainer(loss_fn, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if loop.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), loop.grad_clip)
            opt.step()
        state.step += 1
        record = {"iteration": state.step, "loss": float(loss.detach()), "entropy": float(out["ent"].mean().detach()),
                  **out["info"], **{f"reward_{k}": float(v.mean()) for k, v in rewards.items()},
                  "copy_rate": float((ep.corrected_items == ep.draft_items).float().mean()),
                  "draft_hit": float((ep.draft_items == tgt_items).float().mean()),
                  "corrected_hit": float((ep.corrected_items == tgt_items).float().mean()),
                  # measured, not the (possibly switched-off) R_loc-label reward
                  "loc_acc": float((ep.reflection[:, 0] == first_divergence(ep.draft, tgt)).float().mean())
                  if policy.template.reflect else 0.0, "episodes": len(ep.draft),
                  "iteration_s": time.perf_counter() - t_iter}
        validating = state.step % loop.eval_every == 0 or state.step == loop.iterations
        if validating:
            metrics = validate(policy) if rank == 0 else {}
            record.update({f"valid_{k}": v for k, v in metrics.items()})
            value = distributed.broadcast_float(metrics.get("recall@10", -1.0))
            if value > state.best_metric:
                state.best_metric, state.best_epoch = value, state.step
                if rank == 0:
                    ckpt.save("best", policy, None, {"state": asdict(state)})
            if rank == 0 and log is not None:
                log(record)
        state.history.append(record)
        if on_iteration is not None:
            on_iteration(record)
        if validating and rank == 0:
            save_last()
        distributed.barrier()
    return state
