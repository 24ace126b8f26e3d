"""Data-parallel training under torch.distributed: `torchrun` runs this module once per process.

    torchrun --standalone --nproc_per_node=2 -m tasks.ddp backbone [-S data.dataset=scientific ...]
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 -m tasks.ddp sft
    torchrun --standalone --nproc_per_node=2 -m tasks.ddp grpo -S grpo.threads=1

Each process joins the process group (gloo on CPU, nccl where `*.train.device` is CUDA; with
several GPUs per node each rank takes `cuda:LOCAL_RANK`), trains with `grc_core.train.fit`
under DistributedDataParallel with the same global `batch_size` as a single-process run, and
rank 0 alone writes checkpoints, weights and the stage report, exactly where the stage's flow
writes them: downstream stages (and `dvc repro`) read them unchanged. Interrupted, the same
command resumes from `ckpt/last`. Set `*.train.threads` so that processes x threads does not
exceed the cores of a node (e.g. threads=1 for 2 processes on 2 cores).

Prefect is not involved here: a torchrun job is one unit of work for whatever scheduler runs it
(a Prefect deployment can call this command). GRPO: every rank samples the same episodes from
the one seeded stream and computes the loss of its share of the users (tasks/grpo.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from grc_core import distributed
from tasks import io
from tasks.params import load_params

STAGES = ("backbone", "sft", "grpo")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("-P", "--params", default=None)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    device = {"backbone": params.backbone.train.device, "sft": params.sft.train.device,
              "grpo": params.grpo.device}[args.stage]
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    rank, world = distributed.init_from_env(device)
    try:
        if args.stage == "backbone":
            from tasks.backbone import train_backbone

            result = {"dataset": params.data.dataset, **train_backbone.fn(params), "world_size": world}
            name = "backbone.json"
        elif args.stage == "grpo":
            from tasks.grpo import train_grpo

            result = {"dataset": params.data.dataset, **train_grpo.fn(params), "world_size": world}
            name = "grpo.json"
        else:
            from tasks.sft import train_sft

            result = {"dataset": params.data.dataset, "world_size": world}
            for variant in params.sft.variants:
                result[variant] = train_sft.fn(params, variant)
            name = "sft.json"
        if rank == 0:
            io.write_json(params.reports_dir() / name, result)
            print(f"{args.stage}: {world} process(es); report {params.reports_dir() / name}", flush=True)
    finally:
        distributed.shutdown()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
