"""Backbone training throughput on this machine against its matmul ceiling.

    python -m benchmarks.train_speed [--steps 30] [--batch 256] [--cf-token | --dense-head | --dropout]

Times forward + backward + AdamW steps of the default-size model on synthetic batches
shaped like Instruments (history 20, 5 ID levels of sizes 256/256/256/256/3), with
dropout 0 and 0.1, and the fp32 matmul rate of the same 2 threads. `--cf-token` times instead
the item layout without dropout, plain and with `backbone.model.cf_token` (a random frozen SASRec
of params.yaml's `sasrec` size over 10,000 items, read once per batch), alternating the two five
times; JSON `train_speed_cf_token.json`. `--dense-head` does the same with
`backbone.model.dense_head` over 10,000 items (its item cross-entropy added to the loss at weight
1); JSON `train_speed_dense_head.json`. `--dropout` times the item layout at dropout 0, 0.1 and 0.2
(`backbone.model.dropout`: residual branches, feed-forward and attention weights), alternating the
three five times; JSON `train_speed_dropout.json`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from benchmarks.common import save, stamp
from grc_core.model import Batch, ModelConfig, Seq2Seq, count_flops_per_sample, sequence_loss
from grc_core.sasrec import SASRec
from grc_core.train import TrainConfig, make_optimizer
from tasks.params import load_params

LEVELS = [256, 256, 256, 256, 3]


def matmul_gflops(n: int, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


CF_ITEMS = 10_000


VARIANTS = ("cf_token", "dense_head")  # ModelConfig flags timed against the plain model
DROPOUTS = (0.0, 0.1, 0.2)  # --dropout's settings


def step_rate(dropout: float, batch: int, steps: int, layout: str, variant: str = "") -> dict:
    cfg = ModelConfig(d_model=128, d_ff=640, n_heads=4, encoder_layers=1, decoder_layers=2, dropout=dropout,
                      layout=layout, max_history=20, cf_token=variant == "cf_token",
                      dense_head=variant == "dense_head")
    torch.manual_seed(0)
    cf = None
    if cfg.cf_token:
        cf = SASRec(CF_ITEMS, replace(load_params().sasrec, max_len=20))
    model = Seq2Seq(cfg, LEVELS, attr_sizes=[], n_items=CF_ITEMS if cfg.dense_head else 0, cf=cf).train()
    opt = make_optimizer(model, TrainConfig(1, batch, 1e-3, 0.01, 1, 0.1, 1.0, 1, 0, 0, "cpu", 2))
    gen = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, v, (batch, 20), generator=gen) for v in LEVELS], -1)
    b = Batch(codes, torch.zeros(batch, 20, 0, dtype=torch.long), torch.ones(batch, 20, dtype=torch.bool),
              torch.stack([torch.randint(0, v, (batch,), generator=gen) for v in LEVELS], -1),
              torch.randint(0, CF_ITEMS, (batch, 20), generator=gen))
    target_items = torch.randint(0, CF_ITEMS, (batch,), generator=gen)

    def one():
        if cfg.dense_head:
            logits, dense = model(b, dense=True)
            loss = sequence_loss(logits, b.target_codes) + F.cross_entropy(dense, target_items)
        else:
            loss = sequence_loss(model(b), b.target_codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    dt = time.perf_counter() - t0
    sps = batch * steps / dt
    flops = 3 * count_flops_per_sample(cfg, LEVELS, 20)
    return {"dropout": dropout, "layout": layout, "variant": variant or "plain", "samples_per_s": round(sps, 1),
            "gflops_per_s": round(sps * flops / 1e9, 2), "flops_per_sample": flops}


def alternated(settings: dict[str, tuple[float, str]], batch: int, steps: int, rounds: int = 5
               ) -> tuple[list[dict], dict[str, float]]:
    """Each setting (name -> (dropout, variant)) timed on the item layout once per round, in the
    given order, `rounds` times: the runs (each with its `setting`) and each setting's median
    samples/s, so that load drifting during the benchmark falls on every setting alike."""
    runs = [{**step_rate(d, batch, steps, "item", v), "setting": name}
            for _ in range(rounds) for name, (d, v) in settings.items()]
    return runs, {name: statistics.median(r["samples_per_s"] for r in runs if r["setting"] == name)
                  for name in settings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    for variant in VARIANTS:
        ap.add_argument(f"--{variant.replace('_', '-')}", action="store_true",
                        help=f"plain against {variant} (item layout, no dropout)")
    ap.add_argument("--dropout", action="store_true",
                    help="dropout 0 against 0.1 and 0.2 (item layout)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    chosen = [v for v in VARIANTS if getattr(args, v)]
    if len(chosen) + args.dropout > 1:
        ap.error(f"one of {['--' + v.replace('_', '-') for v in (*VARIANTS, 'dropout')]} at a time")
    if args.dropout:
        runs, rate = alternated({str(d): (d, "") for d in DROPOUTS}, args.batch, args.steps)
        save("train_speed_dropout", {**stamp(vars(args)), "runs": runs, "median_samples_per_s": rate,
                                     "time_ratio_to_0": {d: round(rate["0.0"] / r, 3) for d, r in rate.items()}})
        return
    if chosen:
        variant = chosen[0]
        runs, rate = alternated({"plain": (0.0, ""), variant: (0.0, variant)}, args.batch, args.steps)
        save(f"train_speed_{variant}", {**stamp(vars(args)), "runs": runs, "median_samples_per_s": rate,
                                        f"{variant}_time_ratio": round(rate["plain"] / rate[variant], 3)})
        return
    ceiling = {"matmul_256": round(matmul_gflops(256, 200), 1), "matmul_1024": round(matmul_gflops(1024), 1)}
    runs = [step_rate(d, args.batch, args.steps, layout) for layout in ("item", "code") for d in (0.0, 0.1)]
    for r in runs:
        r["share_of_100_gflops"] = round(r["gflops_per_s"] / 100, 3)
        r["share_of_measured_1024_ceiling"] = round(r["gflops_per_s"] / ceiling["matmul_1024"], 3)
    save("train_speed", {**stamp(vars(args)), "ceiling_gflops": ceiling, "runs": runs})


if __name__ == "__main__":
    main()
