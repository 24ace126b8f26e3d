"""Issue 16 in one plot: each method's test Recall@10 against the SASRec of the same run, as a
share of SASRec's, with its paired 95% bootstrap interval, one group of bars per run; the +5% line
is the issue's target.

    python -m benchmarks.champion_summary [--out benchmarks/results/champion_summary.png]

Reads JSONs under benchmarks/results/ that `benchmarks.seeds_table` (the pipeline's per-user rank
files), `benchmarks.cf_fusion` and `benchmarks.beam_width` (its widest beam) wrote; computes
nothing new. A run may combine several JSONs
only where they scored the same users with the same models (the user count, SASRec's Recall@10
and every shared method's difference to it are checked), so a figure of one run is never set
beside another run's SASRec. The late fusion shown is the one `benchmarks.cf_fusion` or
`benchmarks.beam_width` chose on validation (linear or reciprocal-rank; per seed in the latter).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tasks import io
from tasks.env import PROJECT_ROOT
from tasks.report import pyplot, save_png

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
METRIC = "recall@10"
# (label, the JSONs of one run): the runs of RESULTS.md's issue 16 tables that scored every test user.
RUNS = (
    ("ml-100k\ndefaults (cf IDs)", ("pipeline_defaults_ml-100k_test", "cf_fusion_ml-100k_ids_cf")),
    ("ml-100k, defaults\nseeds 2026-2030,\nplain champion,\nseed-averaged", ("seeds_ml-100k_defaults",)),
    ("ml-100k, seeds\n2026-2030, the\npipeline's champion\n(w chosen),\nseed-averaged", ("seeds_ml-100k_weight_chosen",)),
    ("ml-100k, history 50\n(the default since\n2026-12-05), seeds\n2026-2030, champion,\nseed-averaged", ("seeds_ml-100k_history50",)),
    ("ml-100k, history 50,\nseeds 2026-2030 of\n'A dense head', GRC\n+ V_cf, champion,\nseed-averaged",
     ("seeds_ml-100k_grc_vcf", "beam_width_ml-100k_ml100k_s2026-2030", "seeds_ml-100k_tiger_cf_pair_vs_sasrec_s2026-2030")),
    ("ml-100k, seeds\n2028-2030 through\nthe pipeline at\nd34cd30 (the\nensemble),\nseed-averaged",
     ("seeds_ml-100k_pipeline_ensemble_s2028-2030",)),
    ("scientific\nseed 2026", ("grc_all_scientific_s2026_vs_sasrec",)),
    ("scientific\nseed 2027", ("grc_all_scientific_s2027_vs_sasrec",)),
    ("scientific\nseed 2028", ("grc_all_scientific_s2028_vs_sasrec",)),
    ("scientific seed 2026\nrerun 2026-12-04", ("cf_fusion_scientific_ids_text_all_s2026_rerun",)),
    ("scientific, seeds\n2026-2030 through\nthe pipeline\n(w chosen),\nseed-averaged", ("seeds_scientific_pipeline_weight_chosen",)),
    ("scientific, history 50\nseeds 2026-2027\n(code of f2432cb),\nseed-averaged",
     ("seeds_scientific_history50_vs20",)),
    ("scientific seeds\n2026-2027 of\n2026-12-06,\nseed-averaged", ("seeds_scientific_tiger_cf_pair_runs_s2026-2027",)),
    ("instruments\nprebuilt IDs", ("grc_all_instruments_prebuilt_vs_sasrec", "cf_fusion_instruments_ids_prebuilt_wlow")),
    ("instruments seed 2027\nthrough the pipeline\n(window 50)",
     ("seeds_instruments_s2027_pipeline", "seeds_instruments_tiger_cf_pair_vs_sasrec_s2027")),
    ("instruments seed 2028\nthrough the pipeline\nwith the ensemble", ("seeds_instruments_tiger_cf_pair_s2028",)),
    ("instruments seeds\n2027-2028, the\nensemble,\nseed-averaged", ("seeds_instruments_ensemble_s2027-2028",)),
)
METHODS = {"tiger": "TIGER", "late_fusion": "best late fusion", "tiger_cf": "tiger_cf",
           "tiger_cf_pair": "tiger_cf on the SASRec ensemble (the default since 2026-12-06)",
           "grc_sft": "GRC-SFT (+ V_cf)", "grc_rl": "GRC-RL (+ V_cf)",
           "champion": "each seed's validation champion (the dump)"}
TARGET = 5.0  # percent of SASRec's Recall@10


def read_run(doc: dict, name: str) -> tuple[int, float, dict[str, dict]]:
    """(users, SASRec's Recall@10, {method: paired test against SASRec}) of one JSON: a
    `benchmarks.seeds_table` JSON of one run, or of several seeds (their seed-averaged tests and
    SASRec's mean), a `benchmarks.cf_fusion` JSON, or a `benchmarks.beam_width` JSON (its widest beam)."""
    if "seeds" in doc and len(doc["dirs"]) > 1:  # several seeds: their seed-averaged tests, against their mean
        if "seed_averaged_vs_sasrec" not in doc:
            raise ValueError(f"{name}: {len(doc['dirs'])} seeds with no seed_averaged_vs_sasrec (the seeds ranked "
                             "different users, or SASRec was not the first method)")
        users = {int(s["users"]) for s in doc["seeds"].values()}
        paired = {m: v[METRIC] for m, v in doc["seed_averaged_vs_sasrec"].items()}
        return users.pop(), float(doc["mean_std"]["sasrec"][METRIC]["mean"]), paired
    if "seeds" in doc:
        seed = doc["seeds"][doc["dirs"][0]]
        methods = seed["methods"]
        paired = {m: v["vs_sasrec"][METRIC] for m, v in methods.items() if "vs_sasrec" in v}
        return int(seed["users"]), float(methods["sasrec"]["metrics"][METRIC]), paired
    if "test" in doc and "paired" in doc["test"]:
        test = doc["test"]
        paired = {m: v["vs_sasrec"][METRIC] for m, v in test["paired"].items() if "vs_sasrec" in v}
        late = doc["valid"]["chosen"]["late_fusion"]
        paired = {("late_fusion" if m == late else m): v for m, v in paired.items() if m not in ("rrf", "linear")
                  or m == late}
        return int(test["users"]), float(test["metrics"]["sasrec"][METRIC]), paired
    if "by_beam" in doc:  # the widest beam: the evaluate stage's; the late fusion chosen per seed on validation
        row = doc["by_beam"][str(max(int(b) for b in doc["by_beam"]))]
        paired = {"tiger_cf": row["paired_recall@10"]["tiger_cf_vs_sasrec"],
                  "late_fusion": row["paired_recall@10"]["late_fusion_vs_sasrec"]}
        return int(row["test_users"]), float(row["test"]["sasrec"][METRIC]), paired
    raise ValueError(f"{name}: not a benchmarks.seeds_table, benchmarks.cf_fusion or benchmarks.beam_width JSON")


def combine(label: str, docs: dict[str, dict]) -> dict:
    """One run's row: users, SASRec's Recall@10 and each method's difference to it, in percent of
    it. Raises if the JSONs do not share their users and SASRec."""
    users, sasrec, paired = None, None, {}
    for name, doc in docs.items():
        u, s, p = read_run(doc, name)
        if users is not None and (u != users or abs(s - sasrec) > 1e-9):
            raise ValueError(f"{label}: {name} scored {u} users with SASRec {METRIC} {s:.6f}, the run's other JSONs "
                             f"{users} users with {sasrec:.6f}: not the same run")
        users, sasrec = u, s
        for m, v in p.items():
            if m in paired and abs(paired[m]["diff"] - v["diff"]) > 1e-9:
                raise ValueError(f"{label}: {name} has {m} {v['diff']:+.6f} against SASRec, the run's other JSONs "
                                 f"{paired[m]['diff']:+.6f}: not the same run")
            paired.setdefault(m, v)
    rows = {}
    for m in METHODS:
        if m in paired:
            v = paired[m]
            rows[m] = {"diff": v["diff"], "ci_low": v["ci_low"], "ci_high": v["ci_high"], "p_value": v["p_value"],
                       **{f"{k}_pct": 100 * v[k] / sasrec for k in ("diff", "ci_low", "ci_high")}}
    return {"label": label, "json": list(docs), "users": users, "sasrec": sasrec, "methods": rows}


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(13.0, 1.7 * len(rows)), 5.5))  # room for each run's label
    width = 0.8 / len(METHODS)
    for j, method in enumerate(METHODS):
        x = np.arange(len(rows)) + (j - (len(METHODS) - 1) / 2) * width
        have = [i for i, r in enumerate(rows) if method in r["methods"]]
        if not have:
            continue
        d = np.array([[rows[i]["methods"][method][k] for k in ("diff_pct", "ci_low_pct", "ci_high_pct")] for i in have])
        ax.bar(x[have], d[:, 0], width, label=METHODS[method])
        ax.errorbar(x[have], d[:, 0], yerr=[d[:, 0] - d[:, 1], d[:, 2] - d[:, 0]], fmt="none", ecolor="black",
                    capsize=2, lw=0.8)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(TARGET, color="red", lw=0.9, ls="--", label=f"target +{TARGET:g}%")
    ax.set_xticks(np.arange(len(rows)), [f"{r['label']}\n{r['users']:,} test users\nSASRec {r['sasrec']:.4f}"
                                         for r in rows], fontsize=7.5)
    ax.set_ylabel(f"test {METRIC} − SASRec's, % of SASRec's\n(paired 95% CI)")
    ax.set_title("Against the SASRec of the same run, every test user")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7.5, ncol=3)
    save_png(fig, path)


def markdown(rows: list[dict]) -> str:
    head = "| run | users | SASRec R@10 | " + " | ".join(METHODS.values()) + " |"
    lines = [head, "|" + "---|" * (3 + len(METHODS))]
    for r in rows:
        cells = []
        for m in METHODS:
            v = r["methods"].get(m)
            cells.append("" if v is None else
                         f"{v['diff_pct']:+.1f}% [{v['ci_low_pct']:+.1f}, {v['ci_high_pct']:+.1f}], "
                         + (f"p {v['p_value']:.3f}" if v["p_value"] >= 0.001 else "p < 0.001"))
        lines.append(f"| {r['label'].replace(chr(10), ' ')} | {r['users']:,} | {r['sasrec']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "champion_summary.png")
    args = ap.parse_args(argv)
    rows = [combine(label, {n: json.loads((RESULTS / f"{n}.json").read_text()) for n in names}) for label, names in RUNS]
    plot(rows, args.out)
    io.write_json(args.out.with_suffix(".json"), {"metric": METRIC, "target_pct": TARGET, "runs": rows})
    print(markdown(rows))
    print(args.out)
    return rows


if __name__ == "__main__":
    main()
