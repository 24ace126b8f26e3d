"""V-STAR tasks (V-STAR paper, Sec. 4): the value head, then RL from the backbone on VED candidate
sets with Sibling-GRPO (`vstar`), and the same loop with plain GRPO on beam candidates (`tiger_rl`,
the control). The core is grc_core/value.py, ved.py and sibling_grpo.py; this module loads,
validates (beam Recall@10 on `vstar.valid_users` validation users), checkpoints and publishes.

Outputs under `data/<dataset>/vstar/`: `policy/` and `tiger_rl/` (a backbone's weights and
config.json, loadable like the backbone), `value/` (the head's weights; config.json holds its
config, `vstar.ved_test` and the test-time value source), `ckpt_vstar/`, `ckpt_tiger_rl/`.
Logs: `reports/<dataset>/vstar_log.csv`, `tiger_rl_log.csv` (dvc plots).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from prefect import task
from tqdm.auto import tqdm

from grc_core.device import resolve_device, set_threads
from grc_core.evaluation import history_mask, rank_with_backbone, ranking_metrics
from grc_core.sibling_grpo import VStarModules, beam_candidates, run_vstar, ved_candidates
from grc_core.train import format_record
from grc_core.value import ValueHead
from grc_core.ved import LearnedValue, ved_decode
from grc_core.data import to_batch
from tasks import io
from tasks.artifacts import (item_index, load_backbone, load_baseline, load_split, load_value_head, model_dir,
                             require_plain_backbone, subset, write_log)
from tasks.checkpoints import Checkpointer
from tasks.params import Params
from tasks.quality import gx_expectations, run_gate
from tasks.stages import STAGES, fingerprint


def item_embeddings(params: Params, n_items: int, device) -> torch.Tensor:
    """(N, E) item embeddings of the step rewards: the embed stage's text vectors or SASRec's item table."""
    out_dir = params.dataset_dir()
    if params.vstar.embedding == "sasrec":
        return load_baseline(out_dir, "cpu").item_emb.weight[1:].detach().to(device)
    tensors, _ = io.read_safetensors(out_dir / "embeddings.safetensors")
    emb = torch.as_tensor(np.asarray(tensors["embeddings"]), dtype=torch.float32)
    if emb.shape[0] != n_items:
        raise ValueError(f"embeddings.safetensors: {emb.shape[0]} rows for {n_items} items; with items without text "
                         "set vstar.embedding: sasrec")
    return emb.to(device)


def _save_module(where: Path, module: torch.nn.Module, config: dict) -> None:
    io.write_safetensors(where / "model.safetensors", {k: v.detach().cpu().contiguous()
                                                       for k, v in module.state_dict().items()})
    io.write_json(where / "config.json", config)


@task
def train_variant(params: Params, variant: str) -> dict:
    """Train `vstar` (value head + Sibling-GRPO on VED candidates) or `tiger_rl` (GRPO on beam candidates)."""
    vp, out_dir = params.vstar, params.dataset_dir()
    require_plain_backbone(out_dir, f"the vstar stage ({variant} starts from the backbone)")
    device = resolve_device(vp.device)
    set_threads(vp.threads)
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, device)
    n_items = table.codes.shape[0]
    emb = item_embeddings(params, n_items, device)
    train = load_split(out_dir, "train", params.data.max_history)
    valid = subset(load_split(out_dir, "valid", params.data.max_history), vp.valid_users, vp.loop.seed)
    torch.manual_seed(vp.loop.seed)
    policy = load_backbone(out_dir, device).train()
    ref = load_backbone(out_dir, device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    with_value = variant == "vstar"
    head = ValueHead(policy.cfg.d_model, vp.value).to(device) if with_value else None
    mods = VStarModules(policy, head)
    if with_value:
        candidates, rl = ved_candidates(trie, vp.ved), vp.rl
    else:
        candidates, rl = beam_candidates(trie, vp.control_beam), dataclasses.replace(vp.rl, sibling_weight=0.0)

    def validate(model) -> dict[str, float]:
        ranked, _ = rank_with_backbone(model.eval(), valid, table, trie, vp.valid_beam, vp.eval_batch_size,
                                       exclude_history=params.data.exclude_history)
        model.train()
        return ranking_metrics(ranked, valid.target.numpy(), ks=(5, 10, 20))[0]

    total = (vp.value.steps if with_value else 0) + vp.loop.iterations
    bar = tqdm(total=total, unit="it", desc=variant, mininterval=5, dynamic_ncols=True)

    def on_iteration(record: dict) -> None:
        bar.update(1 if record.get("phase") != "start" else 0)

    excl = (lambda hist: history_mask(hist, n_items)) if params.data.exclude_history else None
    t0 = time.perf_counter()
    inputs = [rel for rel in STAGES["vstar"].inputs if vp.embedding == "sasrec" or not rel.startswith("sasrec/")]
    ckpt = Checkpointer(out_dir / "vstar" / f"ckpt_{variant}",
                        fingerprint(params, "vstar", inputs, extra={"variant": variant}))
    state = run_vstar(mods, ref, train, table, trie, emb, vp.value if with_value else None, rl, vp.loop, candidates,
                      validate, ckpt, excl, lambda r: print(f"{variant} " + format_record(r), flush=True), on_iteration)
    bar.close()
    wall = time.perf_counter() - t0
    ckpt.load_weights("best", mods)
    backbone_config = io.read_json(out_dir / "backbone" / "config.json")
    _save_module(out_dir / "vstar" / ("policy" if with_value else "tiger_rl"), policy, backbone_config)
    if with_value:
        _save_module(out_dir / "vstar" / "value", head,
                     {"d_model": policy.cfg.d_model, "value": dataclasses.asdict(vp.value),
                      "ved_test": dataclasses.asdict(vp.ved_test), "ved_value": vp.ved_value,
                      "ved_cf_weight": vp.ved_cf_weight})
    write_log(params.reports_dir() / f"{variant}_log.csv", state.history)
    start = next((r for r in state.history if r.get("phase") == "start"), {})
    rl_rows = [r for r in state.history if r.get("phase") == "rl"]
    return {"iterations": state.step, "best_iteration": state.best_epoch, "best_valid_recall@10": state.best_metric,
            "start_valid_recall@10": start.get("valid_recall@10"), "wall_s_this_run": wall,
            "mean_forward_tokens": float(np.mean([r["forward_tokens"] for r in rl_rows])) if rl_rows and
            "forward_tokens" in rl_rows[0] else None,
            "mean_hit_rate": float(np.mean([r["hit_rate"] for r in rl_rows])) if rl_rows else None,
            "mean_zero_groups": float(np.mean([r["zero_groups"] for r in rl_rows])) if rl_rows else None}


@task
def gate_candidates(params: Params, n_users: int = 200) -> dict:
    """Great Expectations gate on what the stage hands on: the trained policy and value, decoded with
    VED on validation users, give valid, distinct items outside each user's history, within budget."""
    vp, out_dir = params.vstar, params.dataset_dir()
    device = resolve_device(vp.device)
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, device)
    n_items = table.codes.shape[0]
    valid = subset(load_split(out_dir, "valid", params.data.max_history), n_users, vp.loop.seed)
    policy = load_backbone(out_dir, device, model_dir(out_dir, "vstar") / "model.safetensors")
    head, _ = load_value_head(out_dir, device)
    excl = history_mask(valid.history.to(device), n_items)
    res = ved_decode(policy, to_batch(valid, table, with_target=False), trie, vp.ved, LearnedValue(head),
                     excl if params.data.exclude_history else None, torch.Generator().manual_seed(vp.loop.seed))
    users = np.repeat(valid.user.numpy(), res.items.shape[1])
    items = res.items.cpu().numpy().reshape(-1)
    in_hist = excl.gather(1, res.items.clamp_min(0)).cpu().numpy().reshape(-1) & params.data.exclude_history
    frame = pl.DataFrame({"user_id": users, "item": items, "in_history": in_hist,
                          "cost": np.repeat(res.cost.cpu().numpy(), res.items.shape[1])}).filter(pl.col("item") >= 0)
    gxe = gx_expectations()
    return run_gate("vstar_ved_candidates", frame, [
        gxe.ExpectColumnValuesToBeBetween(column="item", min_value=0, max_value=n_items - 1),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item"]),
        gxe.ExpectColumnValuesToBeInSet(column="in_history", value_set=[False]),
        gxe.ExpectColumnValuesToBeBetween(column="cost", min_value=1,
                                          max_value=max(vp.ved.budget, 1 + vp.ved.init_beam * trie.num_levels)),
        gxe.ExpectTableRowCountToBeBetween(min_value=len(valid)),
    ], params.reports_dir())
