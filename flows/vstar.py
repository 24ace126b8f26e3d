"""Stage `vstar`: V-STAR from the backbone (value head, VED candidates, Sibling-GRPO) and its
control tiger_rl (plain GRPO on beam candidates), then a Great Expectations gate on VED's output.

    python -m flows.vstar [-S vstar.loop.iterations=200] [-S vstar.rl.sibling_weight=0]

Each variant resumes from `data/<dataset>/vstar/ckpt_<variant>/last` after an interruption.
"""

from __future__ import annotations

import sys
from typing import Sequence

from prefect import flow, get_run_logger

from tasks import io
from tasks.cli import parse_cli
from tasks.params import Params
from tasks.vstar import gate_candidates, train_variant


@flow(name="vstar")
def vstar_flow(params: Params) -> dict:
    log = get_run_logger()
    result: dict = {"dataset": params.data.dataset}
    for variant in ("vstar", "tiger_rl"):
        result[variant] = train_variant(params, variant)
        log.info("%s: validation Recall@10 %.4f (backbone %.4f), best at iteration %d", variant,
                 result[variant]["best_valid_recall@10"], result[variant]["start_valid_recall@10"],
                 result[variant]["best_iteration"])
    result["gate"] = gate_candidates(params)
    io.write_json(params.reports_dir() / "vstar.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    return vstar_flow(parse_cli(argv, __doc__))


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
