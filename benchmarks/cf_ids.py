"""Collaborative semantic IDs (`tokenize.embedding`): TIGER trained on IDs quantised from the text
embeddings, from SASRec's item embeddings, and from both, each with and without SASRec's prefix
value in the beam (`tiger_cf`); every weight chosen on the validation split.

    python -m benchmarks.cf_ids --base data [--base-reports reports] [--kinds text cf text_cf] [--weights 1 2 4 8]

`--base` is a finished run's data folder (its `<dataset>/` holds the splits, items, text
embeddings and the SASRec the IDs are built from). For each kind the script copies those inputs
into `<work>/<kind>/<dataset>/`, runs `flows.tokenize` and `flows.backbone` there with
`tokenize.embedding=<kind>` (the backbone's settings are params.yaml's; with `--base-reports`, the
kind params.yaml uses is the base run's own tokenizer and backbone, copied), then
`benchmarks.cf_fusion` (validation choices, test once, paired tests against SASRec, first-code
hit rate of the top item) with `--tag _ids_<kind>`. Writes benchmarks/results/cf_ids_<dataset>.json:
per kind the tokenizer's metrics, the backbone's wall time and best epoch, and the cf_fusion
figures; kinds are compared on validation Recall@10 of TIGER (the choice of the default), and
the test paired difference of each kind's TIGER against the first kind's (`--kinds text ...`;
`--kinds prebuilt cf` on instruments, whose `prebuilt` kind is the dataset's own index) is reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks import cf_fusion
from benchmarks.common import commit, copy_run, run_flow, save, stamp
from grc_core import metrics as M
from tasks.env import PROJECT_ROOT
from tasks.params import load_params

# What a kind's run needs from the base run: the ingest's outputs, the text embeddings, SASRec.
# Everything the tokenizer shapes (tokenizer, backbone and what follows) is rebuilt.
REBUILT = ("tokenizer", "backbone", "mine", "sft", "grpo", "eval", "candidates", "vstar")


def kind_settings(kind: str) -> list[str]:
    """The `-S` overrides of one kind of ID: `prebuilt` is the dataset's own index (instruments),
    every other kind is a `tokenize.embedding` the tokenizer trains on."""
    if kind == "prebuilt":
        return ["tokenize.source=prebuilt"]
    return ["tokenize.source=train", f"tokenize.embedding={kind}"]


def default_kind(params) -> str:
    """The kind of ID params.yaml builds for its dataset."""
    return "prebuilt" if params.id_source == "prebuilt" else params.tokenize.embedding


def prepare(base: Path, work: Path, dataset: str, keep: tuple[str, ...] = ()) -> None:
    """Copy the base run's inputs (and the `keep` folders it already built) into `work/<dataset>/`."""
    copy_run(base / dataset, work / dataset, set(REBUILT) - set(keep))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--base", type=Path, required=True, help="a finished run's data folder")
    ap.add_argument("--base-reports", type=Path, default=None,
                    help="its reports folder: with it, the kind params.yaml already uses reuses the run's tokenizer "
                         "and backbone instead of rebuilding them")
    ap.add_argument("--work", type=Path, default=PROJECT_ROOT / "data_alt" / "cf_ids")
    ap.add_argument("--kinds", nargs="+", default=["text", "cf", "text_cf"])
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--valid-users", type=int, default=0, help="validation users of the fusion's choices (0: all)")
    ap.add_argument("--test-users", type=int, default=0, help="test users (0: all)")
    ap.add_argument("--tag", default="", help="suffix of the JSON names (e.g. another seed's run)")
    ap.add_argument("--train-only", action="store_true",
                    help="build each kind's IDs and backbone and stop (several kinds can train in parallel this way; "
                         "a later run without it finds them built)")
    args = ap.parse_args(argv)
    params = load_params(overrides=args.set)
    dataset = params.data.dataset
    report = stamp({"base": str(args.base), "kinds": args.kinds, "weights": args.weights, "overrides": args.set,
                    "cf_share": params.tokenize.cf_share, "valid_users": args.valid_users,
                    "test_users": args.test_users})
    report["commit"] = commit()
    report["params_hash"] = params.section_hash("data", "tokenize", "backbone", "sasrec", "evaluate")
    runs, ranks = {}, {}
    base_reports = args.base_reports.resolve() / dataset if args.base_reports else None
    for kind in args.kinds:
        work = args.work / kind
        where = [f"data.data_dir={work / 'data'}", f"data.reports_dir={work / 'reports'}",
                 *kind_settings(kind), *args.set]
        reports = work / "reports" / dataset
        reuse = kind == default_kind(params) and base_reports is not None
        if reuse:  # the base run built these IDs and this backbone with the same settings
            prepare(args.base.resolve(), work / "data", dataset, keep=("tokenizer", "backbone"))
            reports.mkdir(parents=True, exist_ok=True)
            for name in ("tokenize.json", "backbone.json"):
                shutil.copy2(base_reports / name, reports / name)
            tokenize_s = backbone_s = None
        elif (work / "trained.json").exists():  # built by an earlier (e.g. --train-only) run of this script
            prepare(args.base.resolve(), work / "data", dataset)  # only what the base run made since (e.g. SASRec)
            trained = json.loads((work / "trained.json").read_text())
            tokenize_s, backbone_s = trained["tokenize_s"], trained["backbone_s"]
        else:
            prepare(args.base.resolve(), work / "data", dataset)
            tokenize_s = run_flow("tokenize", where)
            backbone_s = run_flow("backbone", where)
            (work / "trained.json").write_text(json.dumps({"tokenize_s": tokenize_s, "backbone_s": backbone_s}))
        if args.train_only:
            continue
        fusion = cf_fusion.main([*[a for o in where for a in ("-S", o)], "--weights", *map(str, args.weights),
                                 "--bootstrap", str(args.bootstrap), "--tag", f"_ids_{kind}{args.tag}",
                                 "--valid-users", str(args.valid_users), "--test-users", str(args.test_users)])
        runs[kind] = {"tokenize": json.loads((reports / "tokenize.json").read_text()),
                      "backbone": json.loads((reports / "backbone.json").read_text()),
                      "tokenize_s": tokenize_s and round(tokenize_s, 1), "backbone_s": backbone_s and round(backbone_s, 1),
                      "valid": fusion["valid"], "test": fusion["test"], "cost": fusion["cost"]}
        ranks[kind] = fusion.pop("_tiger_test_per_user", None)
        print(f"{kind}: valid TIGER R@10 {fusion['valid']['metrics']['tiger']['recall@10']:.4f}, "
              f"test {fusion['test']['metrics']['tiger']['recall@10']:.4f}", flush=True)
    if args.train_only:
        return report
    report["runs"] = runs
    valid_r10 = {k: (r["valid"]["metrics"]["tiger"]["recall@10"], r["valid"]["metrics"]["tiger"]["ndcg@10"])
                 for k, r in runs.items()}
    report["chosen_on_validation"] = max(valid_r10, key=valid_r10.get)
    reference = args.kinds[0]  # the kind every other one is tested against (text; prebuilt on instruments)
    if ranks.get(reference) is not None:
        report["reference"] = reference
        report["test_vs_reference"] = {
            kind: {k: M.paired_bootstrap(ranks[reference][k], per_user[k], args.bootstrap, 0)
                   for k in ("recall@10", "ndcg@10")}
            for kind, per_user in ranks.items() if kind != reference and per_user is not None}
    save(f"cf_ids_{dataset}{args.tag}", report)
    return report


if __name__ == "__main__":
    main()
