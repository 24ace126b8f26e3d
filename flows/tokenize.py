"""Stage `tokenize`: item embeddings (or a prebuilt index) -> unique semantic IDs and the prefix trie.

    python -m flows.tokenize [-S data.dataset=scientific] [-S tokenize.method=rkmeans] [-S tokenize.embedding=cf]

`tokenize.embedding` picks what is quantised: the text embeddings, SASRec's item embeddings
(`cf`; the stage then reads `sasrec/model.safetensors`) or both (`text_cf`).
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
from prefect import flow, get_run_logger

from tasks import io
from tasks.cli import parse_cli
from tasks.params import Params
from grc_core.semantic_ids import tokenizer_inputs
from tasks.tokenize import gate_ids, sasrec_item_embeddings, save_tokenizer, tokenize_items


@flow(name="tokenize")
def tokenize_flow(params: Params) -> dict:
    log = get_run_logger()
    cfg, out_dir, report_dir = params.tokenize, params.dataset_dir(), params.reports_dir()
    items = io.read_parquet(out_dir / "items.parquet")
    embeddings = np.zeros((0, 0), np.float32)
    if params.id_source == "train":
        text = cf = None
        if cfg.embedding != "cf":
            tensors, meta = io.read_safetensors(out_dir / "embeddings.safetensors")
            text = tensors["embeddings"]
            if meta.get("skipped") == "True":
                raise ValueError(f"{out_dir / 'embeddings.safetensors'}: empty (the embed stage ran with "
                                 f"tokenize.source=prebuilt or tokenize.embedding=cf); re-run embed")
        if cfg.embedding != "text":
            cf = sasrec_item_embeddings(out_dir / "sasrec" / "model.safetensors", items.height)
        embeddings = tokenizer_inputs(cfg.embedding, text, cf, cfg.cf_share)  # (N, D')
    tok = tokenize_items(items, embeddings, cfg, params.id_source)
    gate = gate_ids(tok.ids, tok.level_sizes, items.height, report_dir)
    trained = params.id_source == "train"
    save_tokenizer(out_dir / "tokenizer", tok, {"source": params.id_source, "method": cfg.method if trained else "prebuilt",
                                                "embedding": cfg.embedding if trained else "prebuilt",
                                                "base_levels": int(tok.codes.shape[1])})
    result = {"dataset": params.data.dataset, "embedding": cfg.embedding if trained else "prebuilt", **tok.metrics,
              "gate": gate}
    io.write_json(report_dir / "tokenize.json", result)
    log.info("%d items -> %d distinct IDs of %d levels (sizes %s); %.2f%% collided before disambiguation",
             tok.metrics["n_items"], tok.metrics["n_distinct_ids"], tok.metrics["num_levels_total"],
             tok.level_sizes, 100 * tok.metrics["collision_rate_before"])
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    return tokenize_flow(parse_cli(argv, __doc__))


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
