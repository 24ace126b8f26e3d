"""Why plain RQ-VAE collides: how many items have (near-)identical text embeddings.

    python -m benchmarks.embedding_neighbours --dataset scientific

Reads data/<dataset>/embeddings.safetensors (run `python -m flows.embed` first) and reports the
share of items with an identical embedding and with a neighbour within L2 distance 0.1.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import save, stamp
from tasks.io import read_safetensors
from tasks.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="scientific")
    args = ap.parse_args()
    params = load_params(None, [f"data.dataset={args.dataset}"])
    emb = torch.from_numpy(read_safetensors(params.dataset_dir() / "embeddings.safetensors")[0]["embeddings"])
    d = torch.cdist(emb, emb)  # (N, N)
    d.fill_diagonal_(float("inf"))
    nearest = d.min(dim=1).values  # (N,)
    out = {"items": int(emb.shape[0]),
           "share_identical": float((nearest < 1e-6).float().mean()),
           **{f"share_within_{r}": float((nearest < r).float().mean()) for r in (0.05, 0.1, 0.2)}}
    save(f"embedding_neighbours_{args.dataset}", {**stamp(vars(args)), **out})


if __name__ == "__main__":
    main()
