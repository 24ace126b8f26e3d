"""SASRec distilled into the backbone (`backbone.cf_distill`): does a TIGER trained on SASRec's
next-code distributions make a better TIGER, and a better `tiger_cf`?

    python -m benchmarks.cf_distill -S data.dataset=scientific --runs 0=/tmp/kd/l0/data 0.7=/tmp/kd/l7/data \\
        [--weights 1 2 4] [--valid-users 3000] [--test-users 0] [--tag _s2026]

Each `--runs` entry is `<label>=<data folder>` of a run whose backbone was trained with other
settings: `backbone.cf_distill` λ (label it λ) or `backbone.cf_prior` (`tiger_cf` then decodes it
levelwise, as its config.json says; `tasks.artifacts.backbone_cf_mode`). Its stage report and
per-epoch log (reports/<dataset>/backbone.json and backbone_log.csv beside the data folder) are
copied into the JSON; the first is the reference (usually 0, the plain backbone). The labels
`tiger_distilled` and `tiger_cf_distilled` of the test block name the chosen run's, whichever it
is. Every run shares the same splits, SASRec and IDs (only its backbone differs). On a fixed
`--valid-users` subset of the validation split it decodes, per run, TIGER's beam and `tiger_cf`
at each weight, and SASRec once (`valid.sasrec`: what a champion chosen on validation must beat);
the (run, w) with the best validation Recall@10
(then NDCG@10) is the choice, as is the reference's own w. The test split is then read once for
SASRec, the reference's TIGER and `tiger_cf`, and the chosen run's TIGER and `tiger_cf`, with
paired bootstrap tests (chosen against reference, both against SASRec) and the first-code hit of
the top item. Writes benchmarks/results/cf_distill_<dataset><tag>.json.

`--cache DIR` keeps every decode (one .npz per run, split, user count and weight) and reuses it
on a later call with the same arguments: the reference run can be decoded, validation and test,
while a distilled backbone is still training (call with only `--runs 0=...`), and the full call
then decodes only the new runs. A cached decode is checked against the users it was made for.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from benchmarks.cf_fusion import first_code_hits, metrics_of
from benchmarks.common import RESULTS, commit, save, stamp
from grc_core import metrics as M
from grc_core.evaluation import rank_with_backbone
from tasks.artifacts import (backbone_cf_mode, backbone_prior, item_index, load_backbone, load_baseline,
                             load_split, sasrec_log_probs, sasrec_top, subset)
from tasks.io import sha256_file
from tasks.params import load_params


def run_setting(data_dir: Path, dataset: str) -> dict:
    """A run's backbone stage report (reports/<dataset>/backbone.json beside its data folder), with
    its per-epoch validation log (backbone_log.csv) and the prior it was trained with."""
    reports = data_dir.parent / "reports" / dataset
    out = json.loads((reports / "backbone.json").read_text()) if (reports / "backbone.json").exists() else {}
    if (reports / "backbone_log.csv").exists():
        with open(reports / "backbone_log.csv", newline="") as f:
            out["log"] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    config = data_dir / dataset / "backbone" / "config.json"
    out["cf_prior"] = backbone_prior(data_dir / dataset) if config.exists() else None
    return out


def decode(params, data_dir: Path, split: str, n_users: int, weights, beam: int, batch: int,
           cache: Path | None = None, name: str = "") -> dict:
    """TIGER (w 0) and tiger_cf at each w of one run's backbone on `n_users` of `split`; with
    `cache`, each decode is read from (or written to) `cache`/<name>_<split>_<n_users>_<beam>_w<w>.npz."""
    out_dir = data_dir / params.data.dataset
    inst = subset(load_split(out_dir, split, params.data.max_history), n_users, params.evaluate.users_seed)
    table, trie, _, _ = item_index(out_dir, params.dataset.attributes, "cpu")
    backbone, item_logp = load_backbone(out_dir), sasrec_log_probs(load_baseline(out_dir))
    excl = params.data.exclude_history
    out = {"targets": inst.target.numpy(), "codes": table.codes.numpy(), "inst": inst}
    weights_digest = sha256_file(out_dir / "backbone" / "model.safetensors") if cache is not None else ""
    mode = backbone_cf_mode(out_dir)
    for w in [0.0, *weights]:
        path = cache / f"{name}_{split}_{n_users}_{beam}_w{w:g}.npz" if cache is not None else None
        if path is not None and path.exists():
            with np.load(path) as z:
                if not np.array_equal(z["targets"], out["targets"]) or str(z["backbone"]) != weights_digest:
                    raise ValueError(f"{path}: cached for other users or another backbone than {out_dir}'s; remove it")
                out[w] = z["ranked"]
        else:
            extra = {} if w == 0 else {"item_logp": item_logp, "cf_weight": w, "cf_mode": mode}
            out[w] = rank_with_backbone(backbone, inst, table, trie, beam, batch, exclude_history=excl, **extra)[0]
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, ranked=out[w], targets=out["targets"], backbone=weights_digest)
                tmp.replace(path)
        print(f"{data_dir} {split} w={w}: R@10 {metrics_of(out[w], out['targets'])[0]['recall@10']:.4f}", flush=True)
    return out


def sasrec_ranked(params, data_dir: Path, inst, beam: int, batch: int):
    """SASRec's top `beam` items for `inst` (the runs share one SASRec): (U, beam)."""
    return sasrec_top(load_baseline(data_dir / params.data.dataset), inst, beam, batch,
                      params.data.exclude_history)[0]


def sasrec_valid(params, data_dir: Path, n_users: int, beam: int, batch: int) -> dict:
    """SASRec's validation metrics on the same users: what a champion chosen on validation must beat."""
    inst = subset(load_split(data_dir / params.data.dataset, "valid", params.data.max_history), n_users,
                  params.evaluate.users_seed)
    return metrics_of(sasrec_ranked(params, data_dir, inst, beam, batch), inst.target.numpy())[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--runs", nargs="+", required=True, help="<label>=<data folder> (a λ of backbone.cf_distill, or a name); the first is the reference")
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--beam", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--valid-users", type=int, default=3000, help="validation users (0: all)")
    ap.add_argument("--test-users", type=int, default=0, help="test users (0: all)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tag", default="")
    ap.add_argument("--cache", type=Path, default=None, help="folder keeping every decode for a later call")
    ap.add_argument("--valid-only", action="store_true", help="stop after the validation decodes (fills --cache)")
    ap.add_argument("--sasrec-valid-only", action="store_true",
                    help="add SASRec's validation metrics to an existing JSON of the same arguments and stop")
    args = ap.parse_args(argv)
    params = load_params(overrides=args.set)
    dataset = params.data.dataset
    runs = dict(r.split("=", 1) for r in args.runs)
    runs = {name: Path(d) for name, d in runs.items()}
    ref = next(iter(runs))
    if args.sasrec_valid_only:
        name = f"cf_distill_{dataset}{args.tag}"
        report = json.loads((RESULTS / f"{name}.json").read_text())
        report["valid"]["sasrec"] = sasrec_valid(params, runs[ref], args.valid_users, args.beam, args.batch)
        save(name, report)
        return report
    report = stamp({"runs": {k: str(v) for k, v in runs.items()}, "reference": ref, "weights": args.weights,
                    "beam": args.beam, "overrides": args.set, "valid_users": args.valid_users,
                    "test_users": args.test_users, "dataset": dataset})
    report["commit"] = commit()
    report["params_hash"] = params.section_hash("data", "backbone", "sasrec", "evaluate")
    report["backbone_reports"] = {name: run_setting(d, dataset) for name, d in runs.items()}

    valid, vm = {}, {}
    for name, d in runs.items():
        valid[name] = decode(params, d, "valid", args.valid_users, args.weights, args.beam, args.batch, args.cache, name)
        vm[name] = {str(w): metrics_of(valid[name][w], valid[name]["targets"])[0] for w in [0.0, *args.weights]}

    def best(names, ws):
        return max((vm[n][str(w)]["recall@10"], vm[n][str(w)]["ndcg@10"], -w, n, w) for n in names for w in ws)[3:]
    chosen_run, chosen_w = best(list(runs), args.weights)
    _, ref_w = best([ref], args.weights)
    chosen_tiger, _ = best(list(runs), [0.0])
    report["valid"] = {"users": len(valid[ref]["targets"]), "metrics": vm,
                       "chosen": {"tiger_cf": [chosen_run, chosen_w], "reference_tiger_cf_w": ref_w,
                                  "tiger": chosen_tiger},
                       "first_code_hit": {name: {str(w): first_code_hits(v[w], v["targets"], v["codes"])
                                                 for w in [0.0, *args.weights]} for name, v in valid.items()}}
    report["valid"]["sasrec"] = sasrec_valid(params, runs[ref], args.valid_users, args.beam, args.batch)
    print("validation R@10:", {n: {w: round(m["recall@10"], 4) for w, m in r.items()} for n, r in vm.items()},
          "chosen", report["valid"]["chosen"], flush=True)

    if args.valid_only:
        save(f"cf_distill_{dataset}{args.tag}_valid", report)
        return report
    # the test split, once per chosen configuration
    tests = {ref: decode(params, runs[ref], "test", args.test_users, [ref_w], args.beam, args.batch, args.cache, ref)}
    for name in {chosen_run, chosen_tiger} - {ref}:
        ws = [chosen_w] if name == chosen_run else []
        tests[name] = decode(params, runs[name], "test", args.test_users, ws, args.beam, args.batch, args.cache, name)
    lists = {"sasrec": sasrec_ranked(params, runs[ref], tests[ref]["inst"], args.beam, args.batch),
             "tiger": tests[ref][0.0], "tiger_cf": tests[ref][ref_w],
             "tiger_distilled": tests[chosen_tiger][0.0], "tiger_cf_distilled": tests[chosen_run][chosen_w]}
    targets = tests[ref]["targets"]
    tm, per_user = {}, {}
    for label, ranked in lists.items():
        tm[label], per_user[label] = metrics_of(ranked, targets)
    pairs = [("tiger_cf_distilled", "tiger_cf"), ("tiger_distilled", "tiger"), ("tiger_cf_distilled", "sasrec"),
             ("tiger_cf", "sasrec")]
    report["test"] = {
        "users": len(targets), "metrics": tm,
        "labels": {"tiger": [ref, 0.0], "tiger_cf": [ref, ref_w], "tiger_distilled": [chosen_tiger, 0.0],
                   "tiger_cf_distilled": [chosen_run, chosen_w]},
        "ci95": {label: {k: M.bootstrap_interval(per_user[label][k], args.bootstrap, 0) for k in ("recall@10", "ndcg@10")}
                 for label in lists},
        "paired": {f"{a}_vs_{b}": {k: M.paired_bootstrap(per_user[b][k], per_user[a][k], args.bootstrap, 0)
                                   for k in ("recall@10", "ndcg@10")} for a, b in pairs},
        "first_code_hit": {label: first_code_hits(ranked, targets, tests[ref]["codes"]) for label, ranked in lists.items()}}
    print("test R@10:", {k: round(v["recall@10"], 4) for k, v in tm.items()}, flush=True)
    save(f"cf_distill_{dataset}{args.tag}", report)
    return report


if __name__ == "__main__":
    main()
