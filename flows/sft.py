"""Stage `sft`: fine-tune the backbone on the generate/reflect/correct template (GRC-SFT and GC-SFT).

    python -m flows.sft [-S data.dataset=scientific] [-S 'sft.variants=[grc]']

Resumes each variant from `data/<dataset>/sft/<variant>/ckpt/last` after an interruption.
"""

from __future__ import annotations

import sys
from typing import Sequence

from prefect import flow, get_run_logger

from tasks import io
from tasks.cli import parse_cli
from tasks.params import Params
from tasks.sft import train_sft


@flow(name="sft")
def sft_flow(params: Params) -> dict:
    log = get_run_logger()
    result = {"dataset": params.data.dataset}
    for variant in params.sft.variants:
        result[variant] = train_sft(params, variant)
        log.info("%s-SFT: best validation Recall@10 %.4f at epoch %d", variant.upper(),
                 result[variant]["best_valid_recall@10"], result[variant]["best_epoch"])
    io.write_json(params.reports_dir() / "sft.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    return sft_flow(parse_cli(argv, __doc__))


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
