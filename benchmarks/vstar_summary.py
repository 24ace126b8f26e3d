"""One plot of `benchmarks.vstar`'s runs: each method's Recall@10 difference to TIGER on the test
split, with its paired 95% bootstrap interval, one group of bars per run (dataset and seed).

    python -m benchmarks.vstar_summary [--runs vstar_ml-100k_long vstar_instruments_ids_prebuilt_all ...]
                                       [--out benchmarks/results/vstar_all_users.png]

Reads the JSONs under benchmarks/results/ that `benchmarks.vstar` wrote; computes nothing new.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tasks.env import PROJECT_ROOT
from tasks.params import load_params
from tasks.report import pyplot, save_png

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
RUNS = ("vstar_ml-100k_long", "vstar_instruments_ids_prebuilt_all", "vstar_scientific_ids_text_all",
        "vstar_scientific_ids_text_s2027_all", "vstar_scientific_ids_text_s2028_all")
METHODS = {"sasrec": "SASRec", "tiger_rl": "TIGER-RL", "vstar": "V-STAR (beam)", "vstar_ved": "V-STAR + VED"}


def differences(run: dict, metric: str = "recall@10") -> dict[str, tuple[float, float, float]]:
    """(difference to TIGER, CI low, CI high) of each method's `metric` on test, from the paired tests."""
    out = {}
    for method in METHODS:
        paired = run["test"][method]["vs_tiger"][metric]
        out[method] = (paired["diff"], paired["ci_low"], paired["ci_high"])
    return out


def label(run: dict) -> str:
    """Dataset, the RL seed (`-S vstar.loop.seed=` in the run's command, else params.yaml's) and users."""
    seed = next((a.split("=", 1)[1] for a in run["command"].split() if a.startswith("vstar.loop.seed=")),
                load_params().vstar.loop.seed)
    return f"{run['dataset']} seed {seed}\n{run['test_users']:,} test users"


def plot(runs: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(METHODS)
    for j, method in enumerate(METHODS):
        d = np.array([differences(run)[method] for run in runs.values()])  # (runs, 3)
        x = np.arange(len(runs)) + (j - (len(METHODS) - 1) / 2) * width
        ax.bar(x, d[:, 0], width, label=METHODS[method])
        ax.errorbar(x, d[:, 0], yerr=[d[:, 0] - d[:, 1], d[:, 2] - d[:, 0]], fmt="none", ecolor="black",
                    capsize=2, lw=0.8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(runs)), [label(r) for r in runs.values()], fontsize=8)
    ax.set_ylabel("test Recall@10 − TIGER's (paired 95% CI)")
    ax.set_title("V-STAR against its TIGER backbone, every test user")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), help="JSON names under benchmarks/results/")
    ap.add_argument("--out", type=Path, default=RESULTS / "vstar_all_users.png")
    args = ap.parse_args(argv)
    runs = {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in args.runs}
    plot(runs, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
