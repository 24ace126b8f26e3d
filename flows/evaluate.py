"""Stage `evaluate`: leave-one-out test metrics of every method, full ranking over the catalog.

    python -m flows.evaluate [-S data.dataset=instruments] [-S evaluate.beam=200]

Writes `reports/<dataset>/metrics.json` (DVC metrics), per-user ranks under
`data/<dataset>/eval/`, and appends one record per method to benchmarks/results/quality.jsonl.
"""

from __future__ import annotations

import sys
from typing import Sequence

from prefect import flow, get_run_logger

from tasks import io
from tasks.cli import parse_cli
from tasks.evaluate import append_quality_record, paired_against, rank_test_users, save_ranks, summarize_method
from tasks.params import Params
from tasks.report import write_report


@flow(name="evaluate")
def evaluate_flow(params: Params) -> dict:
    log = get_run_logger()
    out_dir, ev = params.dataset_dir(), params.evaluate
    seed = params.backbone.train.seed
    results = {}
    for method in ev.methods:
        users, ranks, wall, extra = rank_test_users(params, method)
        save_ranks(out_dir, method, users, ranks)
        results[method] = {**summarize_method(ranks, ev.beam, ev.bootstrap, seed), "wall_s": round(wall, 1), **extra}
        append_quality_record(params, method, results[method], wall, seed)
        m = results[method]["metrics"]
        log.info("%s: %s", method, " ".join(f"{k}={v:.4f}" for k, v in m.items()))
    # Paired tests against TIGER: this run's ranks, or those of the last TIGER evaluation on disk.
    base = "tiger" if "tiger" in results or (out_dir / "eval" / "tiger.parquet").exists() else None
    for method in results:
        if base and method != base:
            results[method]["vs_" + base] = paired_against(out_dir, base, method, ev.bootstrap, seed)
    report = {"dataset": params.data.dataset, "beam": ev.beam, "methods": results}
    io.write_json(params.reports_dir() / "metrics.json", report)
    log.info("run report: %s", write_report(params))
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    return evaluate_flow(parse_cli(argv, __doc__))


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
