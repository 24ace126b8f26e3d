"""Stage `embed`: item text -> unit-norm sentence embeddings (safetensors), cached per text.

    python -m flows.embed [-S data.dataset=scientific]

Where no stage reads text vectors (`Params.needs_text_embeddings`: prebuilt semantic IDs, or IDs
quantised from SASRec's item embeddings alone with V-STAR's rewards on SASRec's table too) the
stage skips the encoder, writes an empty embedding table and says so in its report.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

import numpy as np
from prefect import flow, get_run_logger

from tasks import io
from tasks.cli import parse_cli
from tasks.embed import embed_items, gate_embeddings, save_cache
from tasks.params import Params


@flow(name="embed")
def embed_flow(params: Params) -> dict:
    log = get_run_logger()
    out_dir, report_dir = params.dataset_dir(), params.reports_dir()
    items = io.read_parquet(out_dir / "items.parquet")
    start = time.perf_counter()
    if not params.needs_text_embeddings:
        emb, counts = np.zeros((0, 0), np.float32), {"items": items.height, "embedded": 0, "cached": 0}
        log.info("tokenize.source=%s, tokenize.embedding=%s, vstar.embedding=%s: no text embeddings needed, "
                 "writing an empty table", params.tokenize.source, params.tokenize.embedding, params.vstar.embedding)
        skipped = True
    else:
        emb, counts = embed_items(items, params.embed, out_dir / "embeddings_cache.parquet")
        gate_embeddings(emb, items.height, report_dir)
        skipped = False
    cache = out_dir / "embeddings_cache.parquet"
    if not cache.exists():  # a DVC out: it must exist even when nothing was embedded
        save_cache(cache, {})
    io.write_safetensors(out_dir / "embeddings.safetensors", {"embeddings": emb},
                         {"model": params.embed.model, "skipped": str(skipped)})
    result = {"dataset": params.data.dataset, "model": params.embed.model, "dim": int(emb.shape[1]),
              "skipped": skipped, **counts, "wall_s": round(time.perf_counter() - start, 2)}
    io.write_json(report_dir / "embed.json", result)
    log.info("embedded %d of %d items (%d from cache) in %.1f s", counts["embedded"], counts["items"],
             counts["cached"], result["wall_s"])
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    return embed_flow(parse_cli(argv, __doc__))


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
