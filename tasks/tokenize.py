"""Tokenize tasks: embeddings (or a prebuilt index) -> unique semantic IDs, the prefix trie, metrics.

What is quantised is `tokenize.embedding` (grc_core/semantic_ids.py `tokenizer_inputs`): the
text embeddings of the `embed` stage, SASRec's item embeddings (`sasrec_item_embeddings`, the
`sasrec` stage's weights), or both.

Outputs under `data/<dataset>/tokenizer/`:
- `semantic_ids.parquet`: item_id, codes (list of L' ints, the disambiguation level last if any)
- `tokenizer.json`: level sizes (vocabulary of each level), method, source, base levels
- `weights.safetensors`: RQ-VAE weights or k-means codebooks (absent for prebuilt IDs)
- `prefixes.parquet`: the trie of valid ID prefixes (level, node, parent, code, item)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from prefect import task

from grc_core import semantic_ids as sid
from grc_core.kmeans import residual_kmeans, residual_quantise
from grc_core.device import resolve_device
from grc_core.rqvae import code_perplexity, reconstruction_error, train_rqvae
from tasks import io
from tasks.params import TokenizeConfig
from tasks.quality import gx_expectations, run_gate


@dataclass
class Tokenization:
    base_codes: np.ndarray  # (N, L) codes before any re-assignment
    codes: np.ndarray  # (N, L) after the optional last-level re-assignment
    ids: np.ndarray  # (N, L') unique full IDs
    level_sizes: list[int]  # vocabulary of each of the L' levels
    extra_level_size: int
    weights: dict[str, torch.Tensor]
    metrics: dict


SASREC_ITEM_WEIGHTS = "item_emb.weight"  # grc_core/sasrec.py SASRec.item_emb; row 0 is padding


@task
def sasrec_item_embeddings(weights: Path, n_items: int) -> np.ndarray:
    """SASRec's input/output item embeddings (N, D) in item_id order, read from its weights file."""
    tensors, _ = io.read_safetensors(weights)
    if SASREC_ITEM_WEIGHTS not in tensors:
        raise ValueError(f"{weights}: no tensor {SASREC_ITEM_WEIGHTS!r}; is it a SASRec model?")
    table = np.asarray(tensors[SASREC_ITEM_WEIGHTS], dtype=np.float32)[1:]  # (N, D) without the padding row
    if table.shape[0] != n_items:
        raise ValueError(f"{weights}: {table.shape[0]} item embeddings for {n_items} items in items.parquet; "
                         "re-run the sasrec stage")
    return table


@task
def tokenize_items(items: pl.DataFrame, embeddings: np.ndarray, cfg: TokenizeConfig, source: str) -> Tokenization:
    start = time.perf_counter()
    r = cfg.rqvae
    metrics: dict = {"source": source}
    weights: dict[str, torch.Tensor] = {}
    distances = None
    if source == "prebuilt":
        if "prebuilt_code" not in items.columns:
            raise ValueError("items.parquet: field 'prebuilt_code' missing: tokenize.source=prebuilt needs a "
                             "dataset with an `index` file")
        base = sid.parse_prebuilt_codes(items.sort("item_id")["prebuilt_code"].to_list())  # (N, L)
        sizes = [int(base[:, j].max()) + 1 for j in range(base.shape[1])]
    else:
        if embeddings.shape[0] != items.height:
            raise ValueError(f"embeddings.safetensors: {embeddings.shape[0]} rows for {items.height} items")
        metrics["method"] = cfg.method
        if cfg.method == "rqvae":
            result = train_rqvae(embeddings, r)
            base, distances = result.codes, result.last_level_distances
            weights = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
            metrics["reconstruction_mse"] = reconstruction_error(result.model, embeddings)
            metrics["epochs"] = len(result.history)
        else:
            x = torch.as_tensor(embeddings, dtype=torch.float32, device=resolve_device(r.device))
            fit = residual_kmeans(x, r.num_levels, r.codebook_size, r.kmeans_iters, r.seed)
            rq = residual_quantise(x, fit.codebooks)
            base, distances = rq.codes.cpu().numpy(), rq.last_level_distances.cpu().numpy()
            weights = {f"codebook_{j}": c.cpu() for j, c in enumerate(fit.codebooks)}
            metrics["reconstruction_mse"] = float((rq.final_residual ** 2).sum(1).mean())
        sizes = [r.codebook_size] * base.shape[1]
    metrics["collision_rate_before"] = sid.collision_rate(base)
    codes = base
    if cfg.dedup_last_level and distances is not None:
        codes = sid.reassign_last_level(base, distances)
    metrics["collision_rate_after_reassign"] = sid.collision_rate(codes)
    ids, extra = sid.disambiguate(codes)  # (N, L')
    level_sizes = sizes + ([extra] if extra else [])
    metrics.update(
        n_items=int(ids.shape[0]),
        n_distinct_ids=int(len(np.unique(ids, axis=0))),
        base_levels=int(base.shape[1]),
        num_levels_total=int(ids.shape[1]),
        level_sizes=level_sizes,
        extra_level_size=int(extra),
        utilisation=[float(len(np.unique(codes[:, j]))) / sizes[j] for j in range(codes.shape[1])],
        perplexity=code_perplexity(codes, max(sizes)),
        semantic_coherence=sid.semantic_coherence(codes[:, 0], items.sort("item_id")["category_bucket"].to_numpy()),
        wall_s=round(time.perf_counter() - start, 2),
    )
    return Tokenization(base, codes, ids, level_sizes, extra, weights, metrics)


@task
def gate_ids(ids: np.ndarray, level_sizes: list[int], n_items: int, report_dir: Path) -> dict:
    gxe = gx_expectations()
    frame = pl.DataFrame({"item_id": np.arange(ids.shape[0]),
                          "id_key": ["-".join(map(str, row)) for row in ids.tolist()],
                          **{f"c{j}": ids[:, j] for j in range(ids.shape[1])}})
    checks = [
        gxe.ExpectTableRowCountToEqual(value=n_items),
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValuesToBeUnique(column="id_key"),
    ]
    checks += [gxe.ExpectColumnValuesToBeBetween(column=f"c{j}", min_value=0, max_value=size - 1)
               for j, size in enumerate(level_sizes)]
    return run_gate("semantic_ids", frame, checks, report_dir)


@task(retries=2, retry_delay_seconds=2)
def save_tokenizer(out_dir: Path, tok: Tokenization, meta: dict) -> None:
    ids = tok.ids
    io.write_parquet(out_dir / "semantic_ids.parquet", pl.DataFrame(
        {"item_id": np.arange(ids.shape[0]), "codes": ids.tolist()},
        schema={"item_id": pl.Int64, "codes": pl.List(pl.Int32)}))
    edges = sid.prefix_edges(ids)
    io.write_parquet(out_dir / "prefixes.parquet", pl.DataFrame({f: getattr(edges, f) for f in edges._fields}))
    io.write_json(out_dir / "tokenizer.json", {**meta, "level_sizes": tok.level_sizes,
                                               "num_levels": int(ids.shape[1]),
                                               "extra_level_size": tok.extra_level_size})
    if tok.weights:
        io.write_safetensors(out_dir / "weights.safetensors", tok.weights, {"method": meta.get("method", "")})
    else:
        (out_dir / "weights.safetensors").unlink(missing_ok=True)

