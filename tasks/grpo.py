"""GRPO task (GRC paper Sec. 4.2): RL on whole GRC episodes, initialised from GRC-SFT.

Each iteration samples `grpo.users_per_step` training instances (a fixed seeded stream), rolls
out `grpo.group_size` episodes per user with the current policy (`grc_core.grpo`), scores them
with the paper's rewards (`grc_core.rewards`, weights and ablation switches from params),
computes group-relative advantages and takes `grpo.ppo_epochs` AdamW steps on the clipped
surrogate with the KL penalty to the frozen SFT policy. Every `grpo.eval_every` iterations the
policy is validated (two-pass decoding, Recall@10 at `grpo.valid_beam`); the best is kept.
A checkpoint (`ckpt/last`: weights, optimizer, iteration, RNG state, log) is written at each
validation, so an interrupted run resumes where it stopped and gives the same result.

Under torchrun (`torchrun ... -m tasks.ddp grpo`, DistributedDataParallel): every rank samples
the same episodes (same weights, same seeded generator; sampling is the cheap, gradient-free
part), then rank r computes the policy and reference log-probs and the loss of users r, r+W, ...
only, weighted by its share of the episodes, so the averaged gradient is the single-process
gradient up to float summation order. Rank 0 validates and writes checkpoints.

Outputs under `data/<dataset>/grpo/`: `model.safetensors` (best validation), `config.json`;
the per-iteration log goes to `reports/<dataset>/grpo_log.csv` for `dvc plots`.
"""

from __future__ import annotations

import json
import shutil
import time

import torch
from prefect import task
from tqdm.auto import tqdm

from grc_core import distributed
from grc_core.data import to_batch
from grc_core.device import resolve_device, set_threads
from grc_core.evaluation import history_mask, rank_with_grc, ranking_metrics
from grc_core.grc import DecodeConfig, expand_memory
from grc_core.grpo import Episodes, GRPOConfig, episode_logprobs, grpo_loss, sample_episodes
from grc_core.rewards import RewardConfig, group_advantages, grc_rewards
from grc_core.train import TrainerState, load_checkpoint, load_weights, make_optimizer, save_checkpoint
from grc_core.trie import PrefixTrie
from tasks.backbone import load_item_table, load_split, subset, write_log
from tasks.params import Params
from tasks.readers import sha256_file
from tasks.sft import load_grc


@task
def train_grpo(params: Params) -> dict:
    gp, out_dir = params.grpo, params.dataset_dir()
    device = resolve_device(gp.device)
    set_threads(gp.threads)
    attributes = params.dataset.attributes
    table, level_sizes, _ = load_item_table(out_dir, attributes)
    table = table.to(device)
    n_items = table.codes.shape[0]
    trie = PrefixTrie.from_ids(table.codes.cpu().numpy(), level_sizes).to(device)
    train = load_split(out_dir, "train", params.data.max_history)
    valid = subset(load_split(out_dir, "valid", params.data.max_history), gp.valid_users, gp.seed)
    policy = load_grc(out_dir, "grc", device).train()
    ref = load_grc(out_dir, "grc", device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    cfg = GRPOConfig(gp.group_size, gp.clip_eps, gp.kl_beta, gp.ppo_epochs, gp.temperature, gp.advantage)
    rcfg = RewardConfig(gp.beta_cor, gp.beta_last, gp.beta_loc, gp.beta_sem, 1e-6, gp.use_task, gp.use_cor,
                        gp.use_loc, gp.use_sem, gp.use_delta)
    opt = make_optimizer(policy, gp)  # reads gp.lr and gp.weight_decay
    rank, world = distributed.rank_world()
    trainer = distributed.wrap_for_loss(policy)
    work = out_dir / "grpo"
    last, best = work / "ckpt" / "last", work / "ckpt" / "best"
    fingerprint = "|".join([params.section_hash("grpo"), str(params.data.exclude_history),
                            sha256_file(out_dir / "sft" / "grc" / "model.safetensors")])
    state, gen_state = TrainerState(), None
    if (last / "trainer.json").exists():
        meta = json.loads((last / "trainer.json").read_text())
        if meta.get("fingerprint") == fingerprint:
            state = load_checkpoint(last, policy, opt)
            gen_state = torch.tensor(meta["generator"], dtype=torch.uint8)
        else:
            shutil.rmtree(work / "ckpt")
    gen = torch.Generator().manual_seed(gp.seed)
    if gen_state is not None:
        gen.set_state(gen_state)

    def validate() -> dict[str, float]:
        ranked, _ = rank_with_grc(policy, valid, table, trie, DecodeConfig(width=gp.valid_beam, rank_rule=params.evaluate.rank_rule), gp.eval_batch_size,
                               exclude_history=params.data.exclude_history)
        summary, _ = ranking_metrics(ranked, valid.target.numpy(), ks=(5, 10, 20))
        return summary

    if state.step == 0 and not state.history:  # the SFT starting point, for the log and as the first "best"
        metrics = validate() if rank == 0 else {}
        state.best_metric = distributed.broadcast_float(metrics.get("recall@10", 0.0))
        state.best_epoch = 0
        if rank == 0:
            save_checkpoint(best, policy, None, state, {"fingerprint": fingerprint})
        state.history.append({"iteration": 0, **{f"valid_{k}": v for k, v in metrics.items()}})
    total = gp.iterations
    t0 = time.perf_counter()
    episodes_done = 0
    bar = tqdm(total=total, initial=state.step, unit="it", desc="grpo", mininterval=5, dynamic_ncols=True)
    while state.step < total:
        it = state.step
        idx = torch.randint(len(train), (gp.users_per_step,), generator=gen)
        part = train.select(idx)
        batch = to_batch(part, table)
        g = gp.group_size
        exclude = history_mask(part.history.to(device), n_items) if params.data.exclude_history else None
        policy.eval()
        ep = sample_episodes(policy, batch, trie, cfg, gen, exclude)
        excl_rows = exclude.repeat_interleave(g, 0) if exclude is not None else None
        tgt = batch.target_codes.repeat_interleave(g, 0)  # (N, L)
        tgt_items = part.target.to(device).repeat_interleave(g, 0)
        r_loc = ep.reflection[:, 0]
        r_sem = ep.reflection[:, 1:]
        rewards = grc_rewards(ep.draft, ep.corrected, tgt, r_loc, r_sem, table.attrs[ep.draft_items],
                              table.attrs[ep.corrected_items], table.attrs[tgt_items], rcfg)
        groups = torch.arange(gp.users_per_step, device=device).repeat_interleave(g)
        adv = group_advantages(rewards["total"], groups, gp.advantage)
        # This rank's users (all of them on one process) and their episodes (user-major rows).
        mine = torch.arange(rank, gp.users_per_step, world, device=device)  # (b_r,)
        rows = (mine[:, None] * g + torch.arange(g, device=device)).reshape(-1)  # (b_r * G,)
        sub_batch = to_batch(part.select(mine.cpu()), table)
        sub_ep = Episodes(*(x[rows] for x in ep))
        sub_excl = excl_rows[rows] if excl_rows is not None else None
        share = len(rows) * world / len(ep.draft)  # weight: the DDP average is then the mean over all episodes
        with torch.no_grad():
            ref_lp, _ = episode_logprobs(ref, expand_memory(ref.seq.encode(sub_batch), g), sub_ep, trie,
                                         gp.temperature, sub_excl)
        policy.train()
        info: dict[str, float] = {}
        out: dict = {}

        def loss_fn(m, _):
            lp, ent = episode_logprobs(m, expand_memory(m.seq.encode(sub_batch), g), sub_ep, trie, gp.temperature,
                                       sub_excl)
            loss, out["info"] = grpo_loss(lp, sub_ep.logp, ref_lp, adv[rows], cfg)
            out["ent"] = ent
            return loss * share

        for _ in range(gp.ppo_epochs):
            loss = trainer(loss_fn, None)
            info, ent = out["info"], out["ent"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if gp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), gp.grad_clip)
            opt.step()
        state.step += 1
        episodes_done += len(ep.draft)
        hit0 = (ep.draft_items == tgt_items).float().mean()
        hit1 = (ep.corrected_items == tgt_items).float().mean()
        record = {"iteration": state.step, "loss": float(loss.detach()), "entropy": float(ent.mean().detach()),
                  **info, **{f"reward_{k}": float(v.mean()) for k, v in rewards.items()},
                  "copy_rate": float((ep.corrected_items == ep.draft_items).float().mean()),
                  "draft_hit": float(hit0), "corrected_hit": float(hit1),
                  "loc_acc": float(rewards["loc_label"].mean())}
        bar.update(1)
        bar.set_postfix(R=f"{record['reward_total']:.2f}", kl=f"{info['kl']:.3f}", refresh=False)
        if state.step % gp.eval_every == 0 or state.step == total:
            metrics = validate() if rank == 0 else {}
            record.update({f"valid_{k}": v for k, v in metrics.items()})
            value = distributed.broadcast_float(metrics.get("recall@10", -1.0))
            if value > state.best_metric:
                state.best_metric, state.best_epoch = value, state.step
                if rank == 0:
                    save_checkpoint(best, policy, None, state, {"fingerprint": fingerprint})
            if rank == 0:
                print("grpo " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in record.items()), flush=True)
        state.history.append(record)
        if (state.step % gp.eval_every == 0 or state.step == total) and rank == 0:
            save_checkpoint(last, policy, opt, state, {"fingerprint": fingerprint,
                                                       "generator": gen.get_state().tolist()})
        distributed.barrier()
    bar.close()
    wall = time.perf_counter() - t0
    load_weights(best, policy)
    if rank == 0:
        write_log(params.reports_dir() / "grpo_log.csv", state.history)
        shutil.copyfile(best / "model.safetensors", work / "model.safetensors.tmp")
        (work / "model.safetensors.tmp").replace(work / "model.safetensors")
        shutil.copyfile(out_dir / "sft" / "grc" / "config.json", work / "config.json")
    return {"iterations": state.step, "best_iteration": state.best_epoch, "best_valid_recall@10": state.best_metric,
            "start_valid_recall@10": state.history[0].get("valid_recall@10"),
            "episodes_per_s_this_run": episodes_done / max(wall, 1e-9), "wall_s_this_run": wall}
