"""The backbone's validation Recall@10 per epoch, for groups of runs side by side (e.g. 5 and 10 epochs).

    python -m benchmarks.epoch_curves --dataset ml-100k --name ml-100k_epochs5_vs_10 \
        --group "5 epochs" runs/s2028 runs/s2029 --group "10 epochs" runs/ep10/s2028 runs/ep10/s2029

Each run is the root of a finished run (`<run>/reports/<dataset>/backbone_log.csv`, the log the
backbone stage writes for `dvc plots`). The figure is the one that selects the kept epoch: the
stage's validation Recall@10 on `backbone.valid_users` users (its own beam), not the evaluate
stage's. Per group: a thin line per run, its kept epoch (the best validation figure) marked, and a
thick line for the mean over the runs at each epoch all of them reached.
JSON and plot: `benchmarks/results/epoch_curves_<name>.{json,png}`.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, commit, save, stamp
from tasks.report import pyplot, save_png

METRIC = "valid_recall@10"


def read_curve(run: Path, dataset: str) -> list[dict]:
    """(epoch, valid Recall@10) rows of one run's backbone log, in epoch order."""
    path = run / "reports" / dataset / "backbone_log.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no backbone log (has the backbone stage of this run finished?)")
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            try:
                rows.append({"epoch": int(row["epoch"]), METRIC: float(row[METRIC])})
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: row {i}: field epoch or {METRIC} missing or not a number ({e})") from e
    if not rows:
        raise ValueError(f"{path}: no epochs logged")
    return sorted(rows, key=lambda r: r["epoch"])


def summarise(curves: dict[str, list[dict]]) -> dict:
    """Each run's kept epoch and figure, and the mean curve over the epochs every run reached."""
    kept = {run: max(rows, key=lambda r: r[METRIC]) for run, rows in curves.items()}
    last = min(rows[-1]["epoch"] for rows in curves.values())
    by_epoch = [{r["epoch"]: r[METRIC] for r in rows} for rows in curves.values()]
    mean = [{"epoch": e, METRIC: float(np.mean([c[e] for c in by_epoch]))}
            for e in range(1, last + 1) if all(e in c for c in by_epoch)]
    return {"runs": {run: {"curve": rows, "kept_epoch": kept[run]["epoch"], "kept_" + METRIC: kept[run][METRIC]}
                     for run, rows in curves.items()},
            "mean": mean, "mean_kept_" + METRIC: float(np.mean([k[METRIC] for k in kept.values()]))}


def plot(groups: dict[str, dict], title: str, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6.4, 3.8))
    for i, (label, g) in enumerate(groups.items()):
        color = f"C{i}"
        for run in g["runs"].values():
            ax.plot([r["epoch"] for r in run["curve"]], [r[METRIC] for r in run["curve"]], color=color, alpha=0.3,
                    linewidth=1)
            ax.scatter([run["kept_epoch"]], [run["kept_" + METRIC]], color=color, marker="*", s=50, zorder=3)
        ax.plot([r["epoch"] for r in g["mean"]], [r[METRIC] for r in g["mean"]], color=color, linewidth=2.5,
                label=f"{label} (mean of {len(g['runs'])}; kept {g['mean_kept_' + METRIC]:.4f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Recall@10 (selects the epoch)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--name", required=True, help="names the JSON and the plot")
    ap.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "RUN"),
                    help="a label, then the roots of its runs")
    a = ap.parse_args(argv)
    groups = {}
    for label, *runs in a.group:
        if not runs:
            raise SystemExit(f"--group {label!r}: no runs given")
        groups[label] = summarise({run: read_curve(Path(run), a.dataset) for run in runs})
    payload = {**stamp({"dataset": a.dataset, "metric": METRIC}), "commit": commit(), "groups": groups}
    save(f"epoch_curves_{a.name}", payload)
    plot(groups, f"{a.dataset}: the backbone's validation Recall@10 per epoch", RESULTS / f"epoch_curves_{a.name}.png")
    return payload


if __name__ == "__main__":
    main()
