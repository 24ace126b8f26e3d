"""Beam width against quality and cost: `tiger_cf` (SASRec's prefix value steering the beam) and
the late fusions of TIGER's finished beam with SASRec, at each width, over seeds.

    python -m benchmarks.beam_width --dataset ml-100k --dirs <run s2026>/data <run s2027>/data ... \
        --beams 10 20 50 100 200 --weights 1 2 4 8 --tag _ml100k

Why: on ml-100k `tiger_cf` at the evaluate stage's beam of 200 gives the linear late fusion's lists
(RESULTS.md, "The late fusions over the same five seeds"): with 1,682 items a beam of 200 already
holds what SASRec's value would pull in. A narrower beam is cheaper; there steering the search and
re-ranking its result may part. This reads, at every width B:
- `tiger` (the backbone's constrained beam of B), `sasrec` (its top B), `tiger_cf` (the beam of B
  pruned on log pi + w V_cf), `linear` (TIGER's B items re-ranked by log pi + w log p_SASRec),
  `rrf` (reciprocal-rank fusion of the two B-lists) and `late_fusion` (the better of the two on
  validation), through `benchmarks.cf_fusion.rank_all`, the code of the earlier fusion records;
- every weight chosen on the validation split at that width, per seed; the test split then read
  once per width at those weights;
- test users/s of `tiger` and `tiger_cf` (the test decode, one process).

Each (run, width) is cached as `<run>/<dataset>/beam_width/beam<B>.json` (per-user target ranks;
written whole, then renamed; reused only under the same weights, users and params hash), so an
interrupted sweep resumes and several processes can share the
runs (`--no-report` fills the cache only). The report pairs each method's per-user metric averaged
over the seeds (the same users in every run): `tiger_cf` against the late fusion of the same width
chosen on validation, against each of the two (`linear`, `rrf`), against SASRec, and against itself
at the widest beam. Writes benchmarks/results/beam_width_<dataset><tag>.json and a plot (.png) of
test R@10 and users/s against the width.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.cf_fusion import PARAM_SECTIONS, chosen_on_valid, method_keys, metrics_of, rank_all
from benchmarks.common import RESULTS, commit, save, stamp
from grc_core import metrics as M
from tasks import io
from tasks.params import load_params

METHODS = ("sasrec", "tiger", "tiger_cf", "linear", "rrf", "late_fusion")
KEYS = ("recall@10", "ndcg@10")
DEEP = (50, 100, 200)  # further recall cut-offs the report gives where the beam reaches them


def sweep_one(params, beam: int, weights, valid_users: int, test_users: int, batch: int) -> dict:
    """One run at one width: the weights chosen on validation, each method's per-user test ranks,
    the test decode's users/s."""
    valid = rank_all(params, "valid", valid_users, weights, beam, batch)
    vm = {name: metrics_of(valid[name][0], valid["targets"])[0] for name in valid if isinstance(valid[name], tuple)}
    chosen = chosen_on_valid(vm, weights)
    keys = method_keys(chosen)
    t0 = time.perf_counter()
    test = rank_all(params, "test", test_users, [chosen["tiger_cf"]], beam, batch, linear_weights=[chosen["linear"]])
    ranks = {label: M.target_ranks(test[key][0], test["targets"]).astype(int).tolist() for label, key in keys.items()}
    return {"beam": beam, "chosen": chosen,
            "valid": {"users": valid["users"], "recall@10": {k: v["recall@10"] for k, v in vm.items()}},
            "test_users": test["users"], "user_ids": test["user_ids"].astype(int).tolist(), "ranks": ranks,
            "users_per_s": {"tiger": test["users"] / test["tiger_s"],
                            "tiger_cf": test["users"] / test[f"{keys['tiger_cf']}_s"]},
            "wall_s": time.perf_counter() - t0, "commit": commit()}


def cached_sweep(params, beam: int, weights, valid_users: int, test_users: int, batch: int) -> dict:
    path = params.dataset_dir() / "beam_width" / f"beam{beam}.json"
    settings = {"weights": list(weights), "valid_users": valid_users, "test_users": test_users,
                "params_hash": params.section_hash(*PARAM_SECTIONS)}
    if path.exists():
        found = json.loads(path.read_text())
        if found.get("settings") == settings:
            return found
        print(f"{path}: made with other settings {found.get('settings')}; ranking again", flush=True)
    t0 = time.perf_counter()
    result = {"settings": settings, **sweep_one(params, beam, weights, valid_users, test_users, batch)}
    io.write_json(path, result)
    print(f"{path}: beam {beam} in {time.perf_counter() - t0:.0f} s, chosen {result['chosen']}, "
          f"users/s {result['users_per_s']}", flush=True)
    return result


def seed_averaged(runs: list[dict], label: str) -> dict[str, np.ndarray]:
    """Per user (in user order), each metric of `label` averaged over the runs; the runs must rank
    the same users."""
    order = sorted(runs[0]["user_ids"])
    out = []
    for run in runs:
        if sorted(run["user_ids"]) != order:
            raise ValueError(f"beam {run['beam']}: the runs rank different users; pass runs of the same splits")
        by_user = dict(zip(run["user_ids"], run["ranks"][label]))
        out.append(M.per_user_metrics(np.asarray([by_user[u] for u in order]), (10, *DEEP), (10,)))
    return {k: np.mean([metrics[k] for metrics in out], axis=0) for k in out[0]}


# The paired tests of the report, on per-user Recall@10: name -> (baseline, method).
PAIRS = {"tiger_cf_vs_late_fusion": ("late_fusion", "tiger_cf"), "tiger_cf_vs_linear": ("linear", "tiger_cf"),
         "tiger_cf_vs_rrf": ("rrf", "tiger_cf"), "tiger_cf_vs_sasrec": ("sasrec", "tiger_cf"),
         "late_fusion_vs_sasrec": ("sasrec", "late_fusion")}


def report_of(by_beam: dict[int, list[dict]], n_boot: int) -> dict:
    per_beam = {beam: {m: seed_averaged(runs, m) for m in METHODS} for beam, runs in by_beam.items()}
    widest = per_beam[max(by_beam)]["tiger_cf"]["recall@10"]
    rows = {}
    for beam, runs in sorted(by_beam.items()):
        per = per_beam[beam]
        keys = (*KEYS, *(f"recall@{k}" for k in DEEP if k <= beam))
        paired = {name: M.paired_bootstrap(per[a]["recall@10"], per[b]["recall@10"], n_boot, 0)
                  for name, (a, b) in PAIRS.items()}
        paired["tiger_cf_vs_tiger_cf_widest"] = M.paired_bootstrap(widest, per["tiger_cf"]["recall@10"], n_boot, 0)
        rows[beam] = {
            "test": {m: {k: float(per[m][k].mean()) for k in keys} for m in METHODS},
            "paired_recall@10": paired,
            "valid_recall@10_mean": {m: float(np.mean([r["valid"]["recall@10"][method_keys(r["chosen"])[m]]
                                                       for r in runs]))
                                     for m in ("tiger", "tiger_cf", "linear", "rrf")},
            "chosen": [r["chosen"] for r in runs],
            "users_per_s": {m: float(np.mean([r["users_per_s"][m] for r in runs])) for m in ("tiger", "tiger_cf")},
            "test_users": runs[0]["test_users"], "runs": len(runs)}
    return rows


def plot(rows: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beams = sorted(rows)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for m, style in (("sasrec", "k--"), ("tiger", "C0-o"), ("tiger_cf", "C3-o"), ("linear", "C2-s"), ("rrf", "C1-^")):
        ax.plot(beams, [rows[b]["test"][m]["recall@10"] for b in beams], style, label=m)
    ax.set_xscale("log")
    ax.set_xticks(beams, [str(b) for b in beams])
    ax.set_xlabel("beam width")
    ax.set_ylabel("test R@10 (seed-averaged)")
    ax.legend()
    ax.set_title(title)
    for m, style in (("tiger", "C0-o"), ("tiger_cf", "C3-o")):
        bx.plot(beams, [rows[b]["users_per_s"][m] for b in beams], style, label=m)
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xticks(beams, [str(b) for b in beams])
    bx.set_xlabel("beam width")
    bx.set_ylabel("test users/s (decode)")
    bx.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--dirs", nargs="+", required=True, help="the runs' data dirs (data.data_dir), one per seed")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--beams", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--valid-users", type=int, default=0, help="validation users (0: all)")
    ap.add_argument("--test-users", type=int, default=0, help="test users (0: all)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tag", default="")
    ap.add_argument("--no-report", action="store_true", help="fill the runs' caches only")
    args = ap.parse_args(argv)
    if min(args.beams) < 10:
        raise SystemExit("--beams: every width must be >= 10 (the report's R@10)")
    by_beam: dict[int, list[dict]] = {b: [] for b in args.beams}
    hashes = []
    for d in args.dirs:
        params = load_params(overrides=[f"data.dataset={args.dataset}", f"data.data_dir={d}", *args.set])
        hashes.append(params.section_hash(*PARAM_SECTIONS))
        for beam in sorted(args.beams, reverse=True):
            by_beam[beam].append(cached_sweep(params, beam, args.weights, args.valid_users, args.test_users,
                                              args.batch))
    if args.no_report:
        return None
    rows = report_of(by_beam, args.bootstrap)
    report = stamp({"dirs": args.dirs, "beams": args.beams, "weights": args.weights, "overrides": args.set,
                    "valid_users": args.valid_users, "test_users": args.test_users})
    report.update({"commit": commit(), "dataset": args.dataset, "params_hashes": hashes,
                   "cache_commits": sorted({r["commit"] for runs in by_beam.values() for r in runs}),
                   "by_beam": {str(b): row for b, row in rows.items()}})
    name = f"beam_width_{args.dataset}{args.tag}"
    save(name, report)
    plot(rows, RESULTS / f"{name}.png", f"{args.dataset}, {len(args.dirs)} run(s)")
    for b, row in rows.items():
        t, p = row["test"], row["paired_recall@10"]
        print(f"beam {b:>4}: R@10 sasrec {t['sasrec']['recall@10']:.4f} tiger {t['tiger']['recall@10']:.4f} "
              f"tiger_cf {t['tiger_cf']['recall@10']:.4f} linear {t['linear']['recall@10']:.4f} "
              f"rrf {t['rrf']['recall@10']:.4f} | cf-late {p['tiger_cf_vs_late_fusion']['diff']:+.4f} "
              f"p {p['tiger_cf_vs_late_fusion']['p_value']:.3f} | users/s tiger {row['users_per_s']['tiger']:.0f} "
              f"tiger_cf {row['users_per_s']['tiger_cf']:.0f}", flush=True)
    return report


if __name__ == "__main__":
    main()
