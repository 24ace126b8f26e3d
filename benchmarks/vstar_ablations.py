"""V-STAR ablations (issue 18; the paper's Sec. 5): the `vstar` variant retrained from one backbone
under one change of params at a time, every variant decoded by the beam at test (as the paper
tests V-STAR), all on the same validation and test users.

    python -m benchmarks.vstar_ablations -S data.data_dir=... [-S vstar.loop.iterations=60] \\
        [--configs grpo sibling sparse value_only entropy_only] [--users 1000] [--work data_alt/vstar_ablations]

`-S data.data_dir` names a finished run whose `vstar` stage trained the reference V-STAR (the
committed blend: `vstar.rl.sibling_weight` 0.5, dense reward, priority V + 0.1 H) with the same
`-S` settings. Each config copies that run's inputs (everything but the stages after the backbone)
into `<work>/<config>/`, trains the `vstar` variant there in this process (`tasks.vstar.train_variant`,
resumable from its checkpoints) and ranks it:
- `grpo`: plain GRPO on VED candidates (`vstar.rl.sibling_weight=0`);
- `sibling`: Sibling-GRPO alone (`vstar.rl.sibling_weight=1`);
- `sparse`: the policy's reward without the dense semantic term (`vstar.rl.dense_weight=0`, the
  paper's exact-match reward);
- `value_only`: VED's priority G = V alone during RL (`vstar.ved.entropy_weight=0`);
- `entropy_only`: G = 0.1 H alone (`vstar.ved.value_weight=0`); the value still orders the leaves
  VED returns as candidates.
Validation and test: Recall@5/10/100/200, NDCG@5/10 of TIGER, the reference and every config on
`--users` fixed users of each split, ranked as `evaluate` ranks them (`tasks.evaluate.rank_users`
with `evaluate.users`, `evaluate.valid_users` and `evaluate.beam` set from the arguments); paired bootstrap tests of each config
against the reference and against TIGER on test. Nothing is chosen here: the configs are ablations
of the committed defaults, reported on both splits. Writes benchmarks/results/vstar_ablations_<dataset><tag>.json
and a plot of every run's validation Recall@10 per RL iteration (the stage's own selection curve,
`vstar.valid_users` users at `vstar.valid_beam`) beside it (`.png`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import polars as pl

from benchmarks.common import commit, copy_run, save, stamp
from grc_core import metrics as M
from tasks.env import PROJECT_ROOT
from tasks.evaluate import rank_users
from tasks.params import load_params
from tasks.report import pyplot, save_png
from tasks.vstar import train_variant

CONFIGS = {"grpo": ["vstar.rl.sibling_weight=0"], "sibling": ["vstar.rl.sibling_weight=1"],
           "sparse": ["vstar.rl.dense_weight=0"], "value_only": ["vstar.ved.entropy_weight=0"],
           "entropy_only": ["vstar.ved.value_weight=0"]}
# What a config rebuilds itself (or does not need): everything the vstar stage and later stages write.
NOT_COPIED = ("vstar", "mine", "sft", "grpo", "eval", "candidates")


def rank(params, method: str, split: str) -> dict:
    """One method on `evaluate.users` / `evaluate.valid_users` fixed users, as `evaluate` ranks them."""
    _, ranks, wall, _ = rank_users.fn(params, method, split)
    per_user = M.per_user_metrics(ranks, M.DEFAULT_KS, M.NDCG_KS)
    return {"per_user": per_user, "metrics": {k: float(v.mean()) for k, v in per_user.items()}, "seconds": wall,
            "users": len(ranks)}


def plot_curves(logs: dict[str, Path], title: str, path: Path) -> None:
    """Validation Recall@10 per iteration of each run (its `<variant>_log.csv`), RL iterations only
    counted (V-STAR's value-only steps come first in its log)."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for name, log in logs.items():
        if not log.exists():
            continue
        rows = pl.read_csv(log).filter(pl.col("valid_recall@10").is_not_null())
        start = rows.filter(pl.col("phase") == "start")["iteration"]
        offset = int(start[0]) if len(start) else 0
        ax.plot(rows["iteration"].to_numpy() - offset, rows["valid_recall@10"].to_numpy(), marker=".", label=name)
    ax.set_xlabel("RL iteration")
    ax.set_ylabel("validation Recall@10")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--users", type=int, default=1000, help="validation and test users (0: all), fixed subsets")
    ap.add_argument("--beam", type=int, default=200)
    ap.add_argument("--work", type=Path, default=PROJECT_ROOT / "data_alt" / "vstar_ablations")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    ranking = [f"evaluate.users={args.users}", f"evaluate.valid_users={args.users}", f"evaluate.beam={args.beam}"]
    base = load_params(overrides=[*args.set, *ranking])
    dataset = base.data.dataset
    report = stamp({"configs": {c: CONFIGS[c] for c in args.configs}, "users": args.users, "beam": args.beam,
                    "overrides": args.set, "base": str(base.dataset_dir())})
    report["commit"] = commit()
    report["dataset"] = dataset
    report["params_hash"] = base.section_hash("data", "backbone", "vstar", "evaluate")
    runs: dict[str, dict] = {}
    ranked: dict[str, dict] = {"tiger": {}, "reference": {}}
    for split in ("valid", "test"):
        ranked["tiger"][split] = rank(base, "tiger", split)
        ranked["reference"][split] = rank(base, "vstar", split)
    for name in args.configs:
        work = args.work.resolve() / name
        copy_run(base.dataset_dir(), work / "data" / dataset, NOT_COPIED)  # resumed: the checkpoints are there
        params = load_params(overrides=[*args.set, *ranking, f"data.data_dir={work / 'data'}",
                                        f"data.reports_dir={work / 'reports'}", *CONFIGS[name]])
        t0 = time.perf_counter()
        runs[name] = train_variant.fn(params, "vstar")
        runs[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        ranked[name] = {split: rank(params, "vstar", split) for split in ("valid", "test")}
        print(name, {s: round(r["metrics"]["recall@10"], 4) for s, r in ranked[name].items()}, flush=True)
    report["training"] = runs
    for split in ("valid", "test"):
        report[split] = {"users": ranked["tiger"][split]["users"],
                         "metrics": {name: r[split]["metrics"] for name, r in ranked.items()}}
    test = {name: r["test"]["per_user"] for name, r in ranked.items()}
    report["test"]["paired"] = {
        name: {f"vs_{ref}": {k: M.paired_bootstrap(test[ref][k], test[name][k], args.bootstrap, 0)
                             for k in ("recall@10", "ndcg@10")}
               for ref in ("reference", "tiger") if ref != name}
        for name in test if name != "tiger"}
    report["test"]["ci95"] = {name: {k: M.bootstrap_interval(pu[k], args.bootstrap, 0) for k in ("recall@10", "ndcg@10")}
                              for name, pu in test.items()}
    path = save(f"vstar_ablations_{dataset}{args.tag}", report)
    logs = {"V-STAR (reference)": base.reports_dir() / "vstar_log.csv", "TIGER-RL": base.reports_dir() / "tiger_rl_log.csv",
            **{f"V-STAR, {name}": args.work.resolve() / name / "reports" / dataset / "vstar_log.csv"
               for name in args.configs}}
    plot_curves(logs, f"{dataset}: RL from the backbone, validation Recall@10", path.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
