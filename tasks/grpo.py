"""GRPO task (GRC paper Sec. 4.2): RL on whole GRC episodes, initialised from GRC-SFT.

Each iteration samples `grpo.loop.users_per_step` training instances (a fixed seeded stream), rolls
out `grpo.rollout.group_size` episodes per user with the current policy (`grc_core.grpo`), scores them
with the paper's rewards (`grc_core.rewards`, weights and ablation switches from `grpo.reward`),
computes group-relative advantages and takes `grpo.rollout.ppo_epochs` AdamW steps on the clipped
surrogate with the KL penalty to the frozen SFT policy. Every `grpo.loop.eval_every` iterations the
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

import time

from prefect import task
from tqdm.auto import tqdm

from grc_core import distributed
from grc_core.device import resolve_device, set_threads
from grc_core.evaluation import history_mask
from grc_core.grpo import run_grpo
from grc_core.train import format_record
from tasks import io
from tasks.artifacts import grc_selection_metrics, item_index, load_grc, load_split, promote_best, subset, write_log
from tasks.checkpoints import Checkpointer
from tasks.params import Params
from tasks.stages import fingerprint


@task
def train_grpo(params: Params) -> dict:
    gp, out_dir = params.grpo, params.dataset_dir()
    device = resolve_device(gp.device)
    set_threads(gp.threads)
    attributes = params.dataset.attributes
    table, trie, _, _ = item_index(out_dir, attributes, device)
    n_items = table.codes.shape[0]
    train = load_split(out_dir, "train", params.data.max_history)
    valid = subset(load_split(out_dir, "valid", params.data.max_history), gp.valid_users, gp.loop.seed)
    policy = load_grc(out_dir, "grc_sft", device).train()
    ref = load_grc(out_dir, "grc_sft", device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    rank, _ = distributed.rank_world()
    work = out_dir / "grpo"

    def validate(model) -> dict[str, float]:
        return grc_selection_metrics(model, valid, table, trie, gp.valid_beam, params.evaluate.rank_rule,
                                     params.evaluate.verify_gamma, gp.eval_batch_size, params.data.exclude_history)

    def log(record: dict) -> None:
        print("grpo " + format_record(record), flush=True)

    bar = tqdm(total=gp.loop.iterations, unit="it", desc="grpo", mininterval=5, dynamic_ncols=True)
    episodes = [0]

    def on_iteration(record: dict) -> None:
        episodes[0] += record["episodes"]
        bar.update(1)
        bar.set_postfix(R=f"{record['reward_total']:.2f}", kl=f"{record['kl']:.3f}", refresh=False)

    exclude_mask = (lambda hist: history_mask(hist, n_items)) if params.data.exclude_history else None
    t0 = time.perf_counter()
    ckpt = Checkpointer(work / "ckpt", fingerprint(params, "grpo"))
    state = run_grpo(policy, ref, train, table, trie, gp.rollout, gp.reward, gp.loop, validate, ckpt,
                     exclude_mask, log, on_iteration)
    bar.n = state.step
    bar.close()
    wall = time.perf_counter() - t0
    ckpt.load_weights("best", policy)
    if rank == 0:
        write_log(params.reports_dir() / "grpo_log.csv", state.history)
        promote_best(work, io.read_json(out_dir / "sft" / "grc" / "config.json"))
    return {"iterations": state.step, "best_iteration": state.best_epoch, "best_valid_recall@10": state.best_metric,
            "start_valid_recall@10": state.history[0].get("valid_recall@10"),
            "episodes_per_s_this_run": episodes[0] / max(wall, 1e-9), "wall_s_this_run": wall}
