"""GRPO runs (and their test evaluation) on another machine, e.g. the paper's Table 3 ablations on a GPU worker.

The loop is `grc_core.grpo.run_grpo`, the one the `grpo` stage runs; only tensors travel:

    # here: the stage's inputs for one config (the -S overrides of the run)
    python -m benchmarks.offload_grpo export --name sci_full --data sci0 -S data.dataset=scientific \
        -S data.data_dir=data_s0 -S grpo.loop.iterations=300 [--egrs-sweep]
    # on the worker (torch, numpy, safetensors, grc_core):
    python -m benchmarks.offload_grpo train --name sci_full --out $OUT --device cuda [--keep-weights]
    # here, for a run whose policy becomes the stage's output: unpack, then run the stage with the same -S
    python -m benchmarks.offload_grpo unpack --tar sci_full.tar --name sci_full --src .offload
    python -m flows.grpo -S ...   # resumes from ckpt/last, finds the run finished, writes grpo/model.safetensors

After training, the worker ranks the same test users as the evaluate stage (`evaluate.users`,
`evaluate.users_seed`) with the best-on-validation policy and with the last one (beam
`evaluate.beam`, the stage's rank rule), and with `--egrs-sweep` the EGRS coefficient sweep of
Table 3 (alpha_e in 0, 0.1, 0.2, 0.4, 0.8) for the SFT start and the last policy under a correction
budget of `evaluate.beam` / 4 beams (`--budget-div`). `<name>.json` holds every ranking's metrics,
the 1-based target rank of every user (for paired tests against the stage's rank files), the
training log and the device.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from benchmarks.offload_backbone import dispatch, offload_parser, pack
from grc_core import metrics as M
from grc_core.data import Instances, ItemTable
from grc_core.evaluation import history_mask, rank_with_grc, ranking_metrics
from grc_core.grc import DecodeConfig, GRCModel, grc_from_config
from grc_core.grpo import GRPOConfig, LoopConfig, run_grpo
from grc_core.rewards import RewardConfig
from grc_core.train import format_record
from grc_core.trie import PrefixTrie
from tasks.checkpoints import Checkpointer

ALPHAS = (0.0, 0.1, 0.2, 0.4, 0.8)


def export(name: str, data: str, out: Path, overrides: list[str], egrs_sweep: bool, budget_div: int) -> None:
    from tasks.artifacts import load_item_table, load_split, subset
    from tasks.params import load_params
    from tasks.io import sha256_file
    from tasks.stages import fingerprint as stage_fingerprint

    params = load_params(overrides=overrides)
    gp, ev, data_dir = params.grpo, params.evaluate, params.dataset_dir()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / f"{data}.npz").exists():
        table, _, _ = load_item_table(data_dir, params.dataset.attributes)
        train = load_split(data_dir, "train", params.data.max_history)
        valid = subset(load_split(data_dir, "valid", params.data.max_history), gp.valid_users, gp.loop.seed)
        test = subset(load_split(data_dir, "test", params.data.max_history), ev.users, ev.users_seed)
        arrays = {"codes": table.codes, "attrs": table.attrs}
        for split, inst in (("train", train), ("valid", valid), ("test", test)):
            arrays.update({f"{split}_user": inst.user, f"{split}_history": inst.history, f"{split}_target": inst.target})
        tmp = out / f"{data}.tmp.npz"
        np.savez_compressed(tmp, **{k: v.numpy().astype(np.int32) for k, v in arrays.items()})
        tmp.replace(out / f"{data}.npz")
        sft = out / f"{data}_sft"
        sft.mkdir(exist_ok=True)
        for f in ("config.json", "model.safetensors"):
            shutil.copyfile(data_dir / "sft" / "grc" / f, sft / f)
    cfg = json.loads((data_dir / "sft" / "grc" / "config.json").read_text())
    fingerprint = stage_fingerprint(params, "grpo")  # the stage's own: it resumes from what this trains
    meta = {"grpo": asdict(gp.rollout), "rewards": asdict(gp.reward), "loop": asdict(gp.loop),
            "level_sizes": cfg["level_sizes"], "valid_beam": gp.valid_beam, "grpo_batch": gp.eval_batch_size,
            "eval_beam": ev.beam, "eval_batch": ev.batch_size, "rank_rule": ev.rank_rule,
            "exclude_history": params.data.exclude_history, "fingerprint": fingerprint, "data": data,
            "egrs_sweep": egrs_sweep, "budget": ev.beam // budget_div, "threads": gp.threads,
            "ckpt_dir": str(data_dir / "grpo" / "ckpt"), "overrides": overrides,
            "sha256_sft": sha256_file(data_dir / "sft" / "grc" / "model.safetensors")}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2))
    print(f"{name}: {out / data}.npz, {out / name}.json")


def load_policy(src: Path, data: str, device: torch.device) -> GRCModel:
    model = grc_from_config(json.loads((src / f"{data}_sft" / "config.json").read_text()))
    model.load_state_dict(load_file(str(src / f"{data}_sft" / "model.safetensors")))
    return model.to(device)


def train(name: str, src: Path, out: Path, device: str, keep_weights: bool) -> None:
    meta = json.loads((src / f"{name}.json").read_text())
    dev = torch.device(device)
    if dev.type == "cpu" and meta["threads"] > 0:
        torch.set_num_threads(meta["threads"])
    with np.load(src / f"{meta['data']}.npz", allow_pickle=False) as z:
        arr = {k: torch.from_numpy(z[k].astype(np.int64)) for k in z.files}
    table = ItemTable(arr["codes"], arr["attrs"]).to(dev)
    n_items = table.codes.shape[0]
    trie = PrefixTrie.from_ids(arr["codes"].numpy(), meta["level_sizes"]).to(dev)
    split = {s: Instances(arr[f"{s}_user"], arr[f"{s}_history"], arr[f"{s}_target"]) for s in ("train", "valid", "test")}
    policy = load_policy(src, meta["data"], dev).train()
    ref = load_policy(src, meta["data"], dev).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    excl = meta["exclude_history"]

    def plain(width: int) -> DecodeConfig:  # as the stage validates (tasks.artifacts.selection_decode)
        return DecodeConfig(width=width, correct_width=0, alpha_e=0.0, reflect_width=0, rank_rule=meta["rank_rule"],
                            verify_gamma=0.0, cf_weight=0.0)

    def rank(model: GRCModel, inst: Instances, cfg: DecodeConfig, batch: int) -> np.ndarray:
        ranked, _ = rank_with_grc(model, inst, table, trie, cfg, batch, exclude_history=excl)
        return ranked

    def validate(model: GRCModel) -> dict[str, float]:
        ranked = rank(model, split["valid"], plain(meta["valid_beam"]), meta["grpo_batch"])
        return ranking_metrics(ranked, split["valid"].target.numpy(), ks=(5, 10, 20))[0]

    def log(record: dict) -> None:
        shown = ("iteration", "valid_recall@10", "reward_total", "draft_hit", "corrected_hit", "copy_rate", "kl")
        print(name, format_record({k: v for k, v in record.items() if k.startswith(shown)}), flush=True)

    work = out / name
    t0 = time.perf_counter()
    state = run_grpo(policy, ref, split["train"], table, trie, GRPOConfig(**meta["grpo"]), RewardConfig(**meta["rewards"]),
                     LoopConfig(**meta["loop"]), validate, Checkpointer(work / "ckpt", meta["fingerprint"]),
                     (lambda h: history_mask(h, n_items)) if excl else None, log)
    wall = time.perf_counter() - t0
    episodes = sum(r.get("episodes", 0) for r in state.history)
    info = {"name": name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "wall_s": wall, "episodes_per_s": episodes / max(wall, 1e-9),
            "best_iteration": state.best_epoch, "best_valid_recall@10": state.best_metric,
            "start_valid_recall@10": state.history[0].get("valid_recall@10"), "iterations": state.step,
            "overrides": meta["overrides"], "fingerprint": meta["fingerprint"], "sha256_sft": meta["sha256_sft"]}
    test = split["test"]
    targets = test.target.numpy()
    evals = {}

    def evaluate(label: str, model: GRCModel, cfg: DecodeConfig) -> None:
        t1 = time.perf_counter()
        ranks = M.target_ranks(rank(model, test, cfg, meta["eval_batch"]), targets)
        per_user = M.per_user_metrics(ranks, M.DEFAULT_KS, M.NDCG_KS)
        evals[label] = {"metrics": M.summarize(per_user), "alpha_e": cfg.alpha_e, "correct_width": cfg.correct_width,
                        "wall_s": time.perf_counter() - t1, "ranks": ranks.astype(int).tolist()}
        print(name, label, {k: round(v, 4) for k, v in evals[label]["metrics"].items()}, flush=True)

    full = plain(meta["eval_beam"])
    last = copy.deepcopy(policy).eval()
    Checkpointer(work / "ckpt", meta["fingerprint"]).load_weights("best", policy)
    evaluate("best", policy.eval(), full)
    evaluate("last", last, full)
    if meta["egrs_sweep"]:
        sft = load_policy(src, meta["data"], dev).eval()
        for who, model in (("sft", sft), ("last", last)):
            for a in ALPHAS:
                evaluate(f"{who}_budget_alpha{a}", model,
                         dataclasses.replace(full, correct_width=meta["budget"], alpha_e=a))
    info["test"] = {k: {kk: vv for kk, vv in v.items() if kk != "ranks"} for k, v in evals.items()}
    result = {**info, "test_users": test.user.numpy().astype(int).tolist(),
              "test_ranks": {k: v["ranks"] for k, v in evals.items()}, "log": state.history}
    (out / f"{name}.json").write_text(json.dumps(result))
    if keep_weights:
        pack(work / "ckpt", info, out / f"{name}.tar")
    shutil.rmtree(work)
    print(json.dumps({k: v for k, v in info.items() if k != "test"}), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap, e, t, _ = offload_parser(__doc__, "tensor file name, shared by runs on the same data and SFT model")
    e.add_argument("--egrs-sweep", action="store_true")
    e.add_argument("--budget-div", type=int, default=4, help="correction beams of the EGRS sweep: evaluate.beam / this")
    t.add_argument("--keep-weights", action="store_true")
    a = ap.parse_args(argv)
    dispatch(a, lambda: export(a.name, a.data, a.out, a.overrides, a.egrs_sweep, a.budget_div),
             lambda: train(a.name, a.src, a.out, a.device, a.keep_weights))


if __name__ == "__main__":
    main(sys.argv[1:])
