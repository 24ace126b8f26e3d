"""Stage `evaluate`: every method ranked on the validation split (the leaderboard that picks the
champion the candidate dump uses) and on the test split (the reported metrics), full ranking over
the catalog.

    python -m flows.evaluate [-S data.dataset=instruments] [-S evaluate.beam=200]

`tiger_cf` is ranked on validation at each weight of `evaluate.cf_weights`; the best one
(`tiger_cf_weight` in the leaderboard) is its leaderboard row and ranks the test split and the dump.
Its collaborative prior is SASRec's distribution, or, where the sasrec stage trained an ensemble
(`sasrec_ensemble.seeds`), the ensemble's at the weight that stage chose (`sasrec_ensemble` in the
leaderboard); `sasrec_ens` ranks the catalog by that distribution alone (left out without an ensemble).
A method whose weights and decoding are another's (an RL stage that kept its iteration 0) takes
that method's ranks instead of decoding again (`tasks.evaluate.rank_or_reuse`; `same_ranks_as`
in metrics.json and quality.jsonl).

Writes `data/<dataset>/eval/leaderboard.json` (validation: the champion, every method's metrics,
the champion's paired margin over the runner-up, tiger_cf's weight), `reports/<dataset>/metrics.json` (DVC
metrics: test metrics and the leaderboard), per-user ranks under `data/<dataset>/eval/` (test)
and `eval/valid/` (validation), and appends one record per method to
benchmarks/results/quality.jsonl. The test split chooses nothing.
"""

from __future__ import annotations

import sys
from typing import Sequence

from prefect import flow, get_run_logger

from grc_core.metrics import choose_weight
from tasks import io
from tasks.artifacts import ENSEMBLE
from tasks.cli import parse_cli
from tasks.evaluate import (append_quality_record, leaderboard, paired_against, rank_or_reuse, rank_users, save_ranks,
                            summarize_method)
from tasks.params import Params
from tasks.report import write_report
from tasks.ui import champion_entry, publish_leaderboard, publish_report


@flow(name="evaluate")
def evaluate_flow(params: Params) -> dict:
    log = get_run_logger()
    out_dir, ev = params.dataset_dir(), params.evaluate
    seed = params.backbone.train.seed
    valid_ranks, tuned, decoded = {}, None, {}
    for method in params.ranked_methods():
        if method == "tiger_cf":  # each weight of evaluate.cf_weights; the best on validation ranks test
            tried = {}
            for w in ev.cf_weights:
                users, tried[w], _, _ = rank_users(params, method, "valid", w)
            tuned = choose_weight(tried)
            ranks = tried[tuned["chosen"]]
            log.info("tiger_cf: w %g chosen on validation (recall@10 %s)", tuned["chosen"],
                     ", ".join(f"{r['weight']:g}: {r['recall@10']:.4f}" for r in tuned["valid"]))
        else:
            users, ranks, _, extra = rank_or_reuse(params, method, "valid", decoded)
            if "same_ranks_as" in extra:
                log.info("%s: the weights and decoding of %s, whose validation ranks it takes", method,
                         extra["same_ranks_as"])
        save_ranks(out_dir, method, users, ranks, "valid")
        valid_ranks[method] = ranks
    board = leaderboard(valid_ranks, ev.beam, ev.bootstrap, seed, ev.champion_default, ev.champion_p)
    if tuned is not None:
        board["tiger_cf_weight"] = tuned
    ensemble = out_dir / ENSEMBLE / "config.json"
    if params.sasrec_ensemble.seeds and ensemble.is_file():  # what steers tiger_cf and ranks sasrec_ens
        record = io.read_json(ensemble)
        board["sasrec_ensemble"] = {k: record[k] for k in ("seeds", "weight", "choice")}
    io.write_json(out_dir / "eval" / "leaderboard.json", board)
    log.info("champion on %d validation users: %s (recall@10 %.4f)%s; rule: %s", board["users"], board["champion"],
             champion_entry(board)["metrics"]["recall@10"],
             f", {board['margin']['recall@10']['diff']:+.4f} over {board['runner_up']}" if "margin" in board else "",
             board["rule"])
    results, decoded = {}, {}
    for method in params.ranked_methods():
        users, ranks, wall, extra = rank_or_reuse(params, method, "test", decoded)
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
    report = {"dataset": params.data.dataset, "beam": ev.beam, "methods": results, "leaderboard": board}
    io.write_json(params.reports_dir() / "metrics.json", report)
    path = write_report(params)
    log.info("run report: %s", path)
    publish_leaderboard(params.data.dataset, board, results)
    publish_report(params.data.dataset, path)
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    return evaluate_flow(parse_cli(argv, __doc__))


if __name__ == "__main__":
    from tasks.cli import run_main  # one message for an input error; main() itself raises (callers, tests)

    run_main(main, sys.argv[1:])
