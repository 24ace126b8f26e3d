"""Stage `grpo`: GRPO on whole generate-reflect-correct episodes, from GRC-SFT (GRC-RL).

    python -m flows.grpo [-S data.dataset=scientific] [-S grpo.rollout.group_size=8] [-S grpo.reward.use_sem=false]

Resumes from `data/<dataset>/grpo/ckpt/last` after an interruption.
"""

from __future__ import annotations

import sys
from typing import Sequence

from prefect import flow, get_run_logger

from tasks import io
from tasks.cli import parse_cli
from tasks.grpo import train_grpo
from tasks.params import Params


@flow(name="grpo")
def grpo_flow(params: Params) -> dict:
    log = get_run_logger()
    result = {"dataset": params.data.dataset, **train_grpo(params)}
    io.write_json(params.reports_dir() / "grpo.json", result)
    log.info("GRC-RL: validation Recall@10 %.4f (SFT start %.4f), best at iteration %d",
             result["best_valid_recall@10"], result["start_valid_recall@10"], result["best_iteration"])
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    return grpo_flow(parse_cli(argv, __doc__))


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
