"""The backbone's epoch selection scored on users it was not made on.

    python -m benchmarks.crossfit_selection --dataset ml-100k --group "ten epochs" <run>/data <run>/data \
        --group "ten epochs, EMA 0.999" <run>/data <run>/data --name ml-100k_ema [--halvings 200]

The backbone keeps the epoch with the best validation Recall@10 (beam `backbone.valid_beam`), and
that same validation split then compares configurations. The kept epoch's score is a maximum over
noisy epochs: a configuration whose per-epoch scores fluctuate more gains more from the choice on
the users it is scored on (the winner's curse), which biases a comparison towards it. From the
per-user ranks of every validation (`data/<dataset>/backbone/ckpt/valid_ranks.parquet`, written
by the backbone since 2026-12-06) this benchmark computes, per run:
- `in_sample`: the kept epoch's Recall@10 on all users (what selection reported);
- `crossfit`: each user's hit at the epoch chosen (first best, as the trainer keeps it) on the
  other half of the users, averaged over `--halvings` random halvings (fixed seed): an estimate
  of the selected model's Recall@10 on users the choice never saw, from the same validation split;
- `optimism`: in_sample − crossfit.
Groups list the same seeds in the same order; each group after the first is compared with the
first per user (the metric averaged over the seeds, paired bootstrap over users), in-sample and
cross-fitted. Writes benchmarks/results/crossfit_selection_<name>.json and a plot of every run's
per-epoch validation Recall@10 with its in-sample and cross-fitted values.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.common import RESULTS, commit, save, stamp
from grc_core import metrics as M
from tasks import io
from tasks.training import VALID_RANKS


def hits_by_epoch(path: Path) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(epochs in order, user ids in order, hits (E, U): 1 where the target is in the top 10)."""
    frame = io.read_parquet(path)
    epochs = sorted(frame["epoch"].unique().to_list())
    users = np.asarray(sorted(frame["user_id"].unique().to_list()))
    hits = np.zeros((len(epochs), len(users)))
    for e, epoch in enumerate(epochs):
        part = frame.filter(pl.col("epoch") == epoch).sort("user_id")
        if not np.array_equal(part["user_id"].to_numpy(), users):
            raise ValueError(f"{path}: epoch {epoch} ranks other users than the other epochs")
        rank = part["rank"].to_numpy()
        hits[e] = (rank >= 1) & (rank <= 10)
    return epochs, users, hits


def crossfit(hits: np.ndarray, halvings: int, seed: int) -> np.ndarray:
    """Per user (U,): the mean over `halvings` random halvings of the user's hit at the epoch with the
    best mean on the other half (first best: the trainer keeps an epoch only on a strict gain)."""
    n = hits.shape[1]
    rng = np.random.default_rng(seed)
    out = np.zeros(n)
    for _ in range(halvings):
        fold = rng.permutation(n) < n // 2  # (U,) True: half A
        for held in (fold, ~fold):
            chosen = int(np.argmax(hits[:, ~held].mean(axis=1)))  # argmax keeps the first maximum
            out[held] += hits[chosen, held]
    return out / halvings


def run_report(data_dir: Path, dataset: str, halvings: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """(the run's JSON entry, its users, per-user (in-sample, cross-fitted) hits (2, U))."""
    path = Path(data_dir) / dataset / "backbone" / "ckpt" / VALID_RANKS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-user validation ranks (the backbone writes them since 2026-12-06)")
    epochs, users, hits = hits_by_epoch(path)
    kept = int(np.argmax(hits.mean(axis=1)))
    cf = crossfit(hits, halvings, seed)
    entry = {"dir": str(data_dir), "epochs": epochs, "users": len(users),
             "valid_recall@10": [float(v) for v in hits.mean(axis=1)], "kept_epoch": epochs[kept],
             "in_sample": float(hits[kept].mean()), "crossfit": float(cf.mean()),
             "optimism": float(hits[kept].mean() - cf.mean())}
    return entry, users, np.stack([hits[kept], cf])


def compare(groups: dict[str, list[tuple[np.ndarray, np.ndarray]]], n_boot: int) -> dict:
    """Each group after the first against the first: per user, the seed-averaged in-sample and
    cross-fitted hits; paired bootstrap (group − first). The runs must hold the same users."""
    names = list(groups)
    first = groups[names[0]]
    out = {}
    for name in names[1:]:
        runs = groups[name]
        if len(runs) != len(first):
            raise ValueError(f"group {name!r} has {len(runs)} runs, {names[0]!r} {len(first)}: pair them by seed")
        if any(not np.array_equal(u, first[0][0]) for u, _ in runs + first):
            raise ValueError("the runs ranked different validation users; a paired comparison needs the same ones")
        mine, base = np.mean([v for _, v in runs], axis=0), np.mean([v for _, v in first], axis=0)  # (2, U)
        out[name] = {kind: M.paired_bootstrap(base[i], mine[i], n_boot, 0)
                     for i, kind in enumerate(("in_sample", "crossfit"))}
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for g, (name, runs) in enumerate(report["groups"].items()):
        c = colours[g % len(colours)]
        for i, run in enumerate(runs):
            ax.plot(run["epochs"], run["valid_recall@10"], color=c, alpha=0.7, label=name if i == 0 else None)
            ax.scatter([run["kept_epoch"]], [run["in_sample"]], color=c, marker="^")
            ax.scatter([run["kept_epoch"]], [run["crossfit"]], color=c, marker="o", facecolors="none")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Recall@10 (backbone, beam of selection)")
    ax.set_title("Kept epoch: in-sample (triangle) and cross-fitted (circle)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "DATA_DIR"),
                    help="a label and its runs' data dirs (one per seed, the same seeds in every group)")
    ap.add_argument("--halvings", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--name", required=True)
    a = ap.parse_args(argv)
    if any(len(g) < 2 for g in a.group):
        raise SystemExit("--group needs a label and at least one data dir")
    report = {**stamp({"halvings": a.halvings, "seed": a.seed, "bootstrap": a.bootstrap}), "commit": commit(),
              "dataset": a.dataset, "groups": {}}
    paired = {}
    for label, *dirs in a.group:
        rows = [run_report(Path(d), a.dataset, a.halvings, a.seed) for d in dirs]
        report["groups"][label] = [r[0] for r in rows]
        paired[label] = [(r[1], r[2]) for r in rows]
        for r in rows:
            e = r[0]
            print(f"{label} | {e['dir']} | kept {e['kept_epoch']} | in-sample {e['in_sample']:.4f} | "
                  f"cross-fitted {e['crossfit']:.4f} | optimism {e['optimism']:+.4f}", flush=True)
    report["vs_first"] = compare(paired, a.bootstrap)
    for name, vs in report["vs_first"].items():
        print(name, "−", a.group[0][0], {k: f"{v['diff']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}], p {v['p_value']:.3f}"
                                        for k, v in vs.items()})
    plot(report, RESULTS / f"crossfit_selection_{a.name}.png")
    save(f"crossfit_selection_{a.name}", report)
    return report


if __name__ == "__main__":
    main()
