"""A change to the pipeline, run on copies of finished seed runs and compared with them.

    python -m benchmarks.variant_runs --base runs/s2026 runs/s2027 --seeds 2026 2027 \
        --out runs/item_embedding --stages backbone evaluate --jobs 2 --tag item_embedding \
        -S 'evaluate.methods=[sasrec,tiger,tiger_cf]' -S backbone.train.threads=1 \
        -S backbone.model.item_embedding=true

Each base is the root of a finished run: the pipeline ran with `-S data.data_dir=<base>/data -S
data.reports_dir=<base>/reports` and its seed as `sasrec.seed` and `backbone.train.seed`. For each
base, side by side up to `--jobs`:
1. `<out>/<base name>` is made: the base's `data/<dataset>/` hard-linked file by file, less the
   outputs of the stages to run (their `outs` in tasks/stages.py), and its `reports/` copied. It is
   refused where a stage that is not run has outputs in the base and reads an output of one that
   is: those outputs would be stale. The settings go to `<copy>/variant.json`; a copy that exists
   is resumed only under the same settings (the flows resume from their own checkpoints).
2. `python -m flows.<stage>` runs for each stage, in the pipeline's order, with the seed, the
   copy's places and the `-S` given; each stage's output goes to `<copy>/<stage>.log`.
3. Where `evaluate` is among the stages, `benchmarks.seeds_table` compares the copies with the
   bases (`--against`), on the validation
   rank files (`eval/valid`) and on test (`eval`): JSONs
   `benchmarks/results/seeds_<dataset>_<tag>_vs_base_valid.json` and `..._vs_base.json`.

Hard links are safe because every stage writes a new file and renames it over the old
(tasks/io.py), and the files of the stages that run are not linked at all. The `-S` given must
include whatever else the base ran with (e.g. `evaluate.methods`, `tokenize.embedding`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import seeds_table
from tasks.deployments import dependency_order, producer
from tasks.env import PROJECT_ROOT
from tasks.params import load_params
from tasks.stages import STAGES

# Flows side by side each start a temporary Prefect server on cores that training keeps busy: the
# 120 s start-up of tasks/env.py and the API's default 30 s request timeout are not always enough.
FLOW_ENV = {"PREFECT_API_REQUEST_TIMEOUT": "300", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "3600"}


def pipeline_order(stages: list[str]) -> list[str]:
    """`stages` ordered so that a stage comes after every listed stage whose outputs it reads."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown} (known: {list(STAGES)})")
    return dependency_order(stages)


def stale_readers(base_data: Path, stages: list[str]) -> list[str]:
    """The stages not in `stages` that have outputs in `base_data` and read an output of one that is."""
    found = []
    for name, stage in STAGES.items():
        if name in stages or not any((base_data / o.path).exists() for o in stage.outs):
            continue
        rewritten = [(i, producer(i)) for i in stage.inputs if producer(i) in stages]
        if rewritten:
            found.append(f"{name} (reads {rewritten[0][0]}, which {rewritten[0][1]} writes again)")
    return found


def prepare_copy(base: Path, copy: Path, dataset: str, stages: list[str], settings: dict) -> None:
    """`copy` as step 1 of the module docstring says; resumes an existing copy under the same settings."""
    record = copy / "variant.json"
    if copy.exists():
        if not record.is_file() or json.loads(record.read_text()) != settings:
            raise ValueError(f"{copy} exists with other settings than {settings} (its variant.json: "
                             f"{record.read_text() if record.is_file() else 'none'}); remove it or choose another --out")
        return
    src = base / "data" / dataset
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no data of dataset {dataset} in this base run")
    stale = stale_readers(src, stages)
    if stale:
        raise ValueError(f"{base}: run these stages too, or their outputs go stale: {'; '.join(stale)}")
    tmp = copy.with_name(copy.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for root, _, files in os.walk(src):
        rel_root = Path(root).relative_to(src)
        for f in files:
            rel = (rel_root / f).as_posix()
            if producer(rel) in stages:  # an output of a stage that runs again
                continue
            (tmp / "data" / dataset / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(Path(root) / f, tmp / "data" / dataset / rel)
    (tmp / "data" / dataset).mkdir(parents=True, exist_ok=True)
    if (base / "reports").is_dir():
        shutil.copytree(base / "reports", tmp / "reports")
    (tmp / "variant.json").write_text(json.dumps(settings, indent=2))
    tmp.rename(copy)


def flow_command(stage: str, copy: Path, seed: int, overrides: list[str]) -> list[str]:
    places = [f"sasrec.seed={seed}", f"backbone.train.seed={seed}", f"data.data_dir={copy / 'data'}",
              f"data.reports_dir={copy / 'reports'}"]
    return [sys.executable, "-m", f"flows.{stage}", *(a for o in [*places, *overrides] for a in ("-S", o))]


def run_copy(copy: Path, seed: int, stages: list[str], overrides: list[str]) -> None:
    env = {**os.environ, **FLOW_ENV}
    for stage in stages:
        print(f"{copy.name}: {stage}", flush=True)
        with open(copy / f"{stage}.log", "w") as log:
            done = subprocess.run(flow_command(stage, copy, seed, overrides), cwd=PROJECT_ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"{copy}: flows.{stage} exited {done.returncode}; see {copy / f'{stage}.log'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", nargs="+", type=Path, required=True, help="roots of finished runs, one per seed")
    ap.add_argument("--seeds", nargs="+", type=int, required=True, help="each base's seed, in the order of --base")
    ap.add_argument("--out", type=Path, required=True, help="where the copies go, one per base")
    ap.add_argument("--stages", nargs="+", required=True)
    ap.add_argument("--tag", required=True, help="names the comparison JSONs")
    ap.add_argument("--methods", nargs="+", default=["sasrec", "tiger", "tiger_cf"])
    ap.add_argument("--jobs", type=int, default=1, help="bases run side by side")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="a params override, as the flows take")
    a = ap.parse_args(argv)
    if len(a.seeds) != len(a.base):
        raise SystemExit(f"--seeds gives {len(a.seeds)} seeds for {len(a.base)} bases")
    dataset = load_params(overrides=a.overrides).data.dataset
    stages = pipeline_order(a.stages)
    copies = [a.out / b.name for b in a.base]
    for base, copy, seed in zip(a.base, copies, a.seeds):
        prepare_copy(base, copy, dataset, stages, {"base": str(base.resolve()), "seed": seed, "stages": stages,
                                                   "overrides": a.overrides})
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        list(pool.map(lambda c: run_copy(*c, stages, a.overrides), zip(copies, a.seeds)))
    if "evaluate" not in stages:  # the copies' rank files are the bases': nothing to compare
        return
    name = f"seeds_{dataset}_{a.tag}_vs_base"
    for subdir, suffix in (("eval/valid", "_valid"), ("eval", "")):
        print(f"\n## {subdir}", flush=True)
        seeds_table.main(["--dataset", dataset, "--dirs", *(str(c / "data") for c in copies),
                          "--against", *(str(b / "data") for b in a.base), "--methods", *a.methods,
                          "--eval-subdir", subdir, "--out", str(PROJECT_ROOT / "benchmarks" / "results" / f"{name}{suffix}.json")])


if __name__ == "__main__":
    main()
