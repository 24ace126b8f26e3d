"""The run report: `reports/<dataset>/report.md` with the metrics table and PNG plots.

One file to read after a run: every evaluated method's metrics (from `metrics.json` and the
per-user ranks under `data/<dataset>/eval/`), Recall@K curves of all methods, the r_loc
distribution of the mined drafts, the reflection-entropy histogram of GRC decoding, and the
training curves (backbone, SFT, GRPO). Plots that have no data yet are left out, and the report
says which. Written atomically; matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tasks import io
from tasks.params import Params
from tasks.stages import RECALL_PLOT_METHODS
from tasks.ui import champion_entry

KS = np.arange(1, 201)
# Columns of reports/<dataset>/recall_at_k.csv, in this order, one per method (the y columns of
# the `recall_at_k` plot in dvc.yaml); a method without a ranks file gets an empty column.
CURVE_METHODS = RECALL_PLOT_METHODS
CURVE_KS = (1, 2, 3, 5, 10, 20, 50, 100, 150, 200)


def write_recall_csv(path: Path, curves: dict[str, np.ndarray]) -> None:
    """Recall@K at CURVE_KS for every method, wide (k, tiger, sasrec, ...), for `dvc plots`."""
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", *CURVE_METHODS])
        for k in CURVE_KS:
            w.writerow([k, *(f"{curves[m][k - 1]:.6f}" if m in curves else "" for m in CURVE_METHODS)])


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def recall_curves(eval_dir: Path) -> dict[str, np.ndarray]:
    """Recall@K for K = 1..200 of every method with a ranks file (rank 0 = not retrieved)."""
    out = {}
    for f in sorted(eval_dir.glob("*.parquet")):
        ranks = io.read_parquet(f)["rank"].to_numpy()
        hit = (ranks[:, None] >= 1) & (ranks[:, None] <= KS[None, :])  # (U, 200)
        out[f.stem] = hit.mean(0)
    return out


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(float(r[x]), float(r[y])) for r in rows if r.get(x) not in (None, "") and r.get(y) not in (None, "")]
    return [p[0] for p in pts], [p[1] for p in pts]


def leaderboard_lines(board: dict | None) -> list[str]:
    """The validation leaderboard and its champion (the method the candidate dump uses by default)."""
    if not board:
        return []
    lines = [f"## Champion on the validation split: {board['champion']}", "",
             f"Rule: {board['rule']}, on {board['users']} validation users (the test split chooses nothing). "
             "`candidates.method: auto` dumps this method.", "",
             "| rank | method | valid R@10 [95% CI] | valid N@10 |", "|---|---|---|---|"]
    for i, m in enumerate(board["methods"], 1):
        lo, hi = m["ci95"]["recall@10"]
        lines.append(f"| {i} | {m['method']} | {m['metrics']['recall@10']:.4f} [{lo:.4f}, {hi:.4f}] | "
                     f"{m['metrics']['ndcg@10']:.4f} |")
    if "margin" in board:
        d = board["margin"]["recall@10"]
        lines += ["", f"{board['champion']} − {board['runner_up']} (paired, validation R@10): {d['diff']:+.4f} "
                      f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], p = {d['p_value']:.3f}"]
    default = board.get("default")
    if default and not default["ranked"]:
        lines += ["", f"The default champion {default['method']} was not ranked: the highest validation R@10 wins."]
    elif default and "challenge" in default:
        d = default["challenge"]["recall@10"]
        verdict = "replaces it" if default["replaced"] else f"does not replace it (needs p < {default['challenge_p']:g})"
        lines += ["", f"{default['challenger']} − the default {default['method']} (paired, validation R@10): "
                      f"{d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], p = {d['p_value']:.3f}: {verdict}."]
    tuned = board.get("tiger_cf_weight")
    if tuned:
        tried = ", ".join(f"{r['weight']:g}: {r['recall@10']:.4f}" for r in tuned["valid"])
        lines += ["", f"tiger_cf decodes with w = {tuned['chosen']:g}, chosen on the same validation users "
                      f"(R@10 per w: {tried}); the test split and the dump use it."]
    ensemble = board.get("sasrec_ensemble")
    if ensemble:
        tried = ", ".join(f"{r['weight']:g}: {r['recall@10']:.4f}" for r in ensemble["choice"]["valid"])
        lines += ["", f"The SASRec ensemble (further seeds {', '.join(map(str, ensemble['seeds']))}) enters with "
                      f"w = {ensemble['weight']:g}, chosen by the sasrec stage on every validation user (R@10 per w: "
                      f"{tried}); its distribution is tiger_cf's prior and sasrec_ens's ranking."]
    return lines + [""]


def write_report(params: Params) -> Path:
    plt = pyplot()
    rep, out_dir = params.reports_dir(), params.dataset_dir()
    figs = rep / "figures"
    lines = [f"# Run report: {params.data.dataset}", "",
             f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')} by `evaluate`.", ""]
    missing = []
    metrics_path = rep / "metrics.json"
    if metrics_path.exists():
        lines += leaderboard_lines(json.loads(metrics_path.read_text()).get("leaderboard"))
        methods = json.loads(metrics_path.read_text())["methods"]
        keys = sorted({k for m in methods.values() for k in m["metrics"]})
        lines += ["## Test metrics (this evaluate run)", "", "| method | users | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for name, m in methods.items():
            vals = " | ".join(f"{m['metrics'][k]:.4f}" if k in m["metrics"] else "" for k in keys)
            lines.append(f"| {name} | {m.get('users', '')} | {vals} |")
        for name, m in methods.items():
            if "vs_tiger" in m:
                d = m["vs_tiger"]
                lines.append(f"\n{name} − TIGER on the same {d.get('users', '')} users: " + ", ".join(
                    f"{k} {d[k]['diff']:+.4f} (p={d[k]['p_value']:.3f})" for k in ("recall@10", "ndcg@10") if k in d))
            if "reflection" in m and m["reflection"]:
                lines.append(f"\n{name} reflection: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in m["reflection"].items() if isinstance(v, float)))
        lines.append("")
    else:
        missing.append("metrics.json")
    curves = recall_curves(out_dir / "eval") if (out_dir / "eval").exists() else {}
    write_recall_csv(rep / "recall_at_k.csv", curves)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, c in curves.items():
            ax.plot(KS, c, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K (test)")
        ax.set_title(f"{params.data.dataset}: Recall@K of every evaluated method")
        ax.legend()
        ax.grid(alpha=0.3)
        save_png(fig, figs / "recall_at_k.png")
        lines += ["## Recall@K", "", "![Recall@K](figures/recall_at_k.png)", "",
                  "(each method's latest ranks file under `data/<dataset>/eval/`; users may differ per method "
                  "where `evaluate.users` chose a subset)", ""]
    else:
        missing.append("Recall@K curves (no ranks files)")
    mine_path = rep / "mine.json"
    if mine_path.exists():
        mine = json.loads(mine_path.read_text())
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.4
        for i, split in enumerate(("train", "valid")):
            share = mine[split]["r_loc_share"]
            xs = np.array([int(k) for k in share])
            ax.bar(xs + (i - 0.5) * width, list(share.values()), width, label=f"{split} instances")
        ax.set_xlabel("r_loc (L+1 = draft correct)")
        ax.set_ylabel("share of mined drafts")
        ax.legend()
        save_png(fig, figs / "r_loc.png")
        lines += ["## Reflection labels", "", "![r_loc](figures/r_loc.png)", "",
                  f"Total variation train vs valid: {mine['r_loc_total_variation']:.3f}", ""]
    else:
        missing.append("r_loc distribution (no mine.json)")
    hist = None
    if metrics_path.exists():
        for name, m in json.loads(metrics_path.read_text())["methods"].items():
            h = (m.get("reflection") or {}).get("entropy_hist")
            if h:
                hist = (name, h)
    if hist:
        name, h = hist
        fig, ax = plt.subplots(figsize=(6, 3.5))
        edges = np.asarray(h["edges"])
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge")
        ax.set_xlabel("mean reflection entropy of a draft (Eq. 24)")
        ax.set_ylabel("drafts")
        ax.set_title(name)
        save_png(fig, figs / "reflection_entropy.png")
        lines += ["## Reflection entropy", "", "![entropy](figures/reflection_entropy.png)", ""]
    else:
        missing.append("reflection-entropy histogram (no GRC method in this evaluate run)")
    panels = [("backbone_log.csv", "epoch", ["valid_recall@10"], "backbone"),
              ("sft_grc_log.csv", "epoch", ["valid_recall@10"], "GRC-SFT"),
              ("sft_gc_log.csv", "epoch", ["valid_recall@10"], "GC-SFT"),
              ("grpo_log.csv", "iteration", ["reward_total", "valid_recall@10"], "GRPO")]
    present = [(p, x, ys, t) for p, x, ys, t in panels if _read_csv(rep / p)]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
        for ax, (p, x, ys, title) in zip(axes[0], present):
            rows = _read_csv(rep / p)
            for y in ys:
                xs, vs = _series(rows, x, y)
                if vs:
                    ax.plot(xs, vs, marker="o", ms=3, label=y)
            ax.set_title(title)
            ax.set_xlabel(x)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        save_png(fig, figs / "training.png")
        lines += ["## Training curves", "", "![training](figures/training.png)", ""]
    else:
        missing.append("training curves (no logs)")
    if missing:
        lines += ["## Not in this report", ""] + [f"- {m}" for m in missing] + [""]
    path = rep / "report.md"
    io.write_text(path, "\n".join(lines))
    return path
