"""Every pipeline stage, declared once: what it reads (params, artifacts, code) and what it writes.

From these declarations come
- `dvc.yaml` (`python -m tasks.stages` writes it; a test fails when the committed file differs),
- each stage's code deps: the import closure of `flows/<stage>.py` over this project's packages,
  so a change to any module a stage loads re-runs it under `dvc repro` and nothing else does,
- the resume fingerprint of every training loop and the candidate dump's fingerprint
  (`fingerprint`): the values of the declared params, the bytes of the declared input artifacts
  and the stage's code. A checkpoint written under another fingerprint is not resumed.

`params` are the keys whose values shape a stage's outputs; `runtime` keys are read too but only
decide how the work is spread (workers, a scheduler address, shard sizes), not what it produces:
they are neither DVC params nor part of a fingerprint. `per_item` keys are DVC params that a
fingerprint leaves out because the work checks their effect piece by piece (the candidate dump
compares each shard's user list, so a new users file re-decodes only the shards it changes). `data.data_dir`, `data.reports_dir` and
`data.dataset` place every stage's files; they are templated into the paths of `dvc.yaml`.
A test (tests/tasks/test_stages.py) reads the code of each stage's import closure and fails when
it reads a params key that its declaration lists in neither.

Artifact paths are relative to `<data_dir>/<dataset>/` (inputs, outs) or
`<reports_dir>/<dataset>/` (metrics, plots).
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Literal

from tasks.env import PROJECT_ROOT
from tasks.io import tree_sha256, write_text

PACKAGES = ("flows", "tasks", "grc_core")
LOCATION = ("data.dataset", "data.data_dir", "data.reports_dir")
DATA = "${data.data_dir}/${data.dataset}"
REPORTS = "${data.reports_dir}/${data.dataset}"


@dataclass(frozen=True)
class Out:
    path: str
    persist: bool = False
    cache: bool = True
    why: str = ""  # a comment in dvc.yaml


@dataclass(frozen=True)
class Plot:
    path: str  # a CSV under reports/<dataset>/
    x: str
    y: str


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outs: tuple[Out, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[Plot, ...] = ()
    runtime: tuple[str, ...] = ()
    per_item: tuple[str, ...] = ()  # params checked item by item (a shard's user list), not by the fingerprint
    comment: str = ""  # a comment on the params list in dvc.yaml
    pool: Literal["cpu", "gpu"] = "gpu"  # the Prefect work pool its deployment runs on (prefect.yaml)

    @property
    def module(self) -> str:
        return f"flows.{self.name}"

    def flow(self):
        """The stage's Prefect flow, `flows.<stage>.<stage>_flow` (imported on call)."""
        import importlib

        return getattr(importlib.import_module(self.module), f"{self.name}_flow")


# Every model folder under data/<dataset>/ a method's ranking reads (its own model first; the
# stage that makes it is the first part): what a candidate dump is fingerprinted with and what a
# published version bundles. tiger_cf decodes the backbone with SASRec's prefix value
# (grc_core/cf_value.py) fused with the sasrec stage's ensemble where it has one (sasrec_ensemble/,
# empty without; tasks/sasrec.py), the GRC methods SASRec's alone where evaluate.grc_cf_weight > 0; the RL-tuned
# policies (tiger_rl, vstar) take their architecture from backbone/config.json.
METHOD_MODELS = {"tiger": ("backbone",), "tiger_cf": ("backbone", "sasrec", "sasrec_ensemble"), "sasrec": ("sasrec",),
                 "sasrec_ens": ("sasrec_ensemble", "sasrec"),
                 "gc_sft": ("sft/gc", "sasrec"), "grc_sft": ("sft/grc", "sasrec"), "grc_rl": ("grpo", "sasrec"),
                 "tiger_rl": ("vstar/tiger_rl", "backbone"), "vstar": ("vstar/policy", "backbone"),
                 "vstar_ved": ("vstar/policy", "vstar/value", "sasrec", "backbone")}
ITEM_ID_METHODS = ("sasrec", "sasrec_ens")  # rank the catalog by item id: no semantic IDs, their item count SASRec's
_MODEL_INPUTS = ("backbone/model.safetensors", "sasrec/model.safetensors", "sasrec_ensemble/model.safetensors",
                 "sasrec_ensemble/config.json", "sft", "grpo/model.safetensors",
                 "vstar/policy/model.safetensors", "vstar/value/model.safetensors", "vstar/tiger_rl/model.safetensors")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest",
          params=("data.max_history", "data.min_sequence_length", "data.drop_short_users", "data.min_title_share",
                  "data.ingest_memory_limit", "datasets"),
          outs=(Out("interactions.duckdb", persist=True,
                    why="the store keeps its ingest history; the flow itself skips unchanged sources"),
                Out("items.parquet"), Out("splits")),
          metrics=("ingest.json",), pool="cpu"),
    Stage("embed",
          params=("datasets", "embed", "tokenize.source", "tokenize.embedding", "vstar.embedding"),
          inputs=("items.parquet",),
          outs=(Out("embeddings.safetensors"),
                Out("embeddings_cache.parquet", persist=True, cache=False,
                    why="texts already embedded are not embedded again")),
          metrics=("embed.json",), pool="cpu"),
    Stage("tokenize",
          params=("datasets", "tokenize"),
          comment=("sasrec: read only when tokenize.embedding is cf or text_cf; with text, a new SASRec re-runs "
                   "this stage, which rebuilds the same IDs, so nothing downstream re-runs"),
          inputs=("items.parquet", "embeddings.safetensors", "sasrec/model.safetensors"),
          outs=(Out("tokenizer"),),
          metrics=("tokenize.json",), pool="cpu"),
    Stage("backbone",
          params=("data.max_history", "data.exclude_history", "datasets", "backbone", "sasrec"),
          comment=("sasrec: read only when backbone.model.cf_token, cf_distill or cf_prior > 0 (the sasrec params too, for "
                   "the cross-fitted teachers of backbone.cf_teacher_folds); under the default cf IDs a new SASRec "
                   "changes the tokenizer, which re-runs this stage anyway"),
          inputs=("splits", "items.parquet", "tokenizer", "sasrec/model.safetensors"),
          outs=(Out("backbone", persist=True, why="keeps ckpt/last so an interrupted run resumes"),),
          metrics=("backbone.json",),
          plots=(Plot("backbone_log.csv", "epoch", "valid_recall@10"),)),
    Stage("sasrec",
          params=("data.max_history", "data.exclude_history", "sasrec", "sasrec_ensemble"),
          comment="data.exclude_history and sasrec_ensemble.weights: the validation choice of the ensemble's weight",
          inputs=("splits", "items.parquet"),
          outs=(Out("sasrec", persist=True, why="keeps ckpt/last so an interrupted run resumes"),
                Out("sasrec_ensemble", persist=True, why="keeps each member's ckpt_<seed>/last so an interrupted run "
                    "resumes")),
          metrics=("sasrec.json",),
          plots=(Plot("sasrec_log.csv", "epoch", "valid_recall@10"),)),
    Stage("mine",
          params=("data.max_history", "data.exclude_history", "datasets", "mine.beam", "mine.top", "mine.sampled",
                  "mine.max_instances", "mine.valid_instances", "mine.batch_size", "mine.seed", "mine.device",
                  "mine.crossfit_folds", "mine.crossfit_epochs", "mine.include_target", "mine.threads", "backbone"),
          runtime=("mine.workers", "mine.dask_address", "mine.shard_batches"),
          comment="backbone: the cross-fitted fold backbones train with these settings",
          inputs=("splits", "items.parquet", "tokenizer", "backbone/model.safetensors", "backbone/config.json"),
          outs=(Out("mine"),),
          metrics=("mine.json",)),
    Stage("sft",
          params=("data.max_history", "data.exclude_history", "datasets", "sft", "evaluate.rank_rule", "evaluate.verify_gamma"),
          inputs=("splits", "items.parquet", "tokenizer", "backbone/model.safetensors", "backbone/config.json",
                  "mine/train.parquet"),
          outs=(Out("sft", persist=True, why="keeps ckpt/last so an interrupted run resumes"),),
          metrics=("sft.json",),
          plots=(Plot("sft_grc_log.csv", "epoch", "valid_recall@10"),
                 Plot("sft_gc_log.csv", "epoch", "valid_recall@10"))),
    Stage("grpo",
          params=("data.max_history", "data.exclude_history", "datasets", "grpo", "evaluate.rank_rule", "evaluate.verify_gamma"),
          inputs=("splits", "items.parquet", "tokenizer", "sft/grc/model.safetensors", "sft/grc/config.json"),
          outs=(Out("grpo", persist=True, why="keeps ckpt/last so an interrupted run resumes"),),
          metrics=("grpo.json",),
          plots=(Plot("grpo_log.csv", "iteration", "reward_total"),)),
    Stage("vstar",
          params=("data.max_history", "data.exclude_history", "datasets", "vstar"),
          inputs=("splits", "items.parquet", "tokenizer", "embeddings.safetensors", "backbone/model.safetensors",
                  "backbone/config.json", "sasrec/model.safetensors"),
          outs=(Out("vstar", persist=True, why="keeps ckpt_*/last so an interrupted run resumes"),),
          metrics=("vstar.json",),
          plots=(Plot("vstar_log.csv", "iteration", "reward_mean"),
                 Plot("tiger_rl_log.csv", "iteration", "reward_mean"))),
    Stage("evaluate",
          params=("data.max_history", "data.exclude_history", "datasets", "evaluate", "vstar.ved_test",
                  "backbone.train.seed", "sasrec_ensemble.seeds"),
          inputs=("splits", "items.parquet", "tokenizer", *_MODEL_INPUTS),
          outs=(Out("eval"),),
          metrics=("metrics.json",)),
    Stage("candidates",
          params=("data.max_history", "data.exclude_history", "datasets", "evaluate", "vstar.ved_test",
                  "sasrec_ensemble.seeds", "candidates.method",
                  "candidates.top_n", "candidates.beam", "candidates.batch_size", "candidates.device"),
          per_item=("candidates.users_per_shard", "candidates.users_file", "candidates.promotion_tolerance"),
          runtime=("candidates.workers", "candidates.dask_address", "candidates.threads"),
          comment=("evaluate (and vstar.ved_test, for evaluate.grc_drafts: ved): the dump decodes under its rules; candidates.users_file is the path only: "
                   "after editing that file, `dvc repro -f -s candidates`"),
          inputs=("splits", "items.parquet", "tokenizer", *_MODEL_INPUTS, "eval/leaderboard.json"),
          outs=(Out("candidates", persist=True, why="a killed run resumes from the shards whose sidecars match"),),
          metrics=("candidates.json",)),
)}

# Outputs DVC tracks outside any stage's outs (drawn by the top-level plot below).
EXTRA_METRICS_OUTS = {"evaluate": ("recall_at_k.csv",)}
RECALL_PLOT_METHODS = tuple(METHOD_MODELS)  # the columns of recall_at_k.csv (tasks/report.py writes it)


# ---------------------------------------------------------------------------------------------
# Code: the import closure of a stage's flow


def module_file(module: str) -> Path | None:
    """The file of a project module (`tasks.io` -> tasks/io.py, a package -> its __init__.py)."""
    base = PROJECT_ROOT.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def parse_source(text: str, attempts: int = 5) -> ast.Module:
    """`ast.parse`, again on CPython 3.11's spurious "AST constructor recursion depth mismatch"
    SystemError (gh-106905: the AST validator's depth counter is not per thread, so a compile()
    in another thread, e.g. a lazy import in one of Prefect's threads, can trip it; it broke a
    stage's code check on a worker once in the suite)."""
    for attempt in range(attempts):
        try:
            return ast.parse(text)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _imports(path: Path, module: str) -> set[str]:
    """Project modules imported anywhere in `path` (top level or inside functions)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(parse_source(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import submodule`
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and module_file(name) is not None:
                found.add(name)
    return found


@lru_cache(maxsize=None)
def import_closure(module: str) -> tuple[str, ...]:
    """Every project file `module` loads, the packages' __init__.py included: sorted relative paths."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(_imports(module_file(mod), mod))
    return tuple(sorted(str(module_file(m).relative_to(PROJECT_ROOT)) for m in seen))


def code_files(stage: str) -> tuple[str, ...]:
    return import_closure(STAGES[stage].module)


def code_digest(stage: str) -> str:
    h = hashlib.sha256()
    for rel in code_files(stage):
        h.update(rel.encode() + b"\0" + (PROJECT_ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Fingerprints


# Where a dataset's source files live (and where to fetch them) is not what they hold: the ingest
# hashes the files themselves, and a copy of the data elsewhere gives the same fingerprints.
SOURCE_LOCATION = ("path", "fetch")


def param_value(raw: dict[str, Any], key: str) -> Any:
    """The value of a dotted key; `datasets` means the spec of the dataset in use, not every spec,
    less its `SOURCE_LOCATION`."""
    if key == "datasets":
        spec = raw["datasets"][raw["data"]["dataset"]]
        return {k: v for k, v in spec.items() if k not in SOURCE_LOCATION}
    node: Any = raw
    for part in key.split("."):
        node = node[part]
    return node


def param_values(params, stage: str, ignore: Iterable[str] = ()) -> dict[str, Any]:
    raw = params.raw
    unknown = set(ignore) - set(STAGES[stage].params)
    if unknown:
        raise ValueError(f"param_values: {sorted(unknown)} are not params of stage {stage!r}")
    return {key: param_value(raw, key) for key in ("data.dataset", *STAGES[stage].params) if key not in ignore}


def input_digests(params, stage: str, inputs: Iterable[str] | None = None) -> dict[str, str]:
    """sha256 of each input artifact of a stage (`inputs` narrows them), by relative path."""
    out_dir = params.dataset_dir()
    return {rel: tree_sha256(out_dir / rel) for rel in (STAGES[stage].inputs if inputs is None else inputs)}


def fingerprint(params, stage: str, inputs: Iterable[str] | dict[str, str] | None = None,
                extra: dict | None = None, ignore: Iterable[str] = ()) -> str:
    """What a stage's outputs depend on: its params' values, its input artifacts' bytes (`inputs`
    narrows them, e.g. to the one method a dump reads; a dict gives digests already computed by
    `input_digests` or `sha256_file`) and its code. `extra` adds what only the caller knows (a
    variant, a fold). `ignore` leaves out params of the stage that one of its outputs does not
    read (the sasrec stage's first model and its ensemble's seeds)."""
    digests = inputs if isinstance(inputs, dict) else input_digests(params, stage, inputs)
    spec = {"stage": stage, "params": param_values(params, stage, ignore), "code": code_digest(stage),
            "inputs": digests, "extra": extra or {}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# dvc.yaml


def _out_lines(indent: str, path: str, persist: bool = False, cache: bool = True, why: str = "") -> list[str]:
    if not persist and cache:
        return [f"{indent}- {path}"]
    lines = [f"{indent}- {path}:"]
    if persist:
        lines.append(f"{indent}    persist: true" + (f"   # {why}" if why else ""))
    if not cache:
        lines.append(f"{indent}    cache: false" + (f"   # {why}" if why and not persist else ""))
    return lines


def render_dvc_yaml() -> str:
    lines = [
        "# Generated by `python -m tasks.stages` from the declarations in tasks/stages.py: edit those, not this.",
        "# One stage per flow: `cmd: python -m flows.<stage>`. Code deps are the import closure of the",
        "# flow; params list only the keys that stage reads; paths are templated from params.yaml.",
        "",
        "stages:",
    ]
    for st in STAGES.values():
        lines += [f"  {st.name}:", f"    cmd: python -m {st.module}", "    deps:"]
        lines += [f"      - {rel}" for rel in code_files(st.name)]
        lines += [f"      - {DATA}/{rel}" for rel in st.inputs]
        lines.append("    params:" + (f"   # {st.comment}" if st.comment else ""))
        lines += [f"      - {key}" for key in st.params + st.per_item]
        lines.append("    outs:")
        for o in st.outs:
            lines += _out_lines("      ", f"{DATA}/{o.path}", o.persist, o.cache, o.why)
        for rel in EXTRA_METRICS_OUTS.get(st.name, ()):
            lines += _out_lines("      ", f"{REPORTS}/{rel}", cache=False, why="drawn by the top-level plot below")
        lines.append("    metrics:")
        for rel in st.metrics:
            lines += _out_lines("      ", f"{REPORTS}/{rel}", cache=False)
        if st.plots:
            lines.append("    plots:")
            for p in st.plots:
                lines += [f"      - {REPORTS}/{p.path}:", f"          x: {p.x}", f"          y: {p.y}",
                          "          cache: false"]
        lines.append("")
    lines += [
        "# `dvc plots show`: the test Recall@K curve of every method, next to the training curves above.",
        "plots:",
        "  - recall_at_k:",
        "      template: linear",
        "      x: k",
        "      y:",
        f"        {REPORTS}/recall_at_k.csv: [{', '.join(RECALL_PLOT_METHODS)}]",
        "      title: Test Recall@K of every method",
        "      x_label: K",
        "      y_label: Recall@K",
    ]
    return "\n".join(lines) + "\n"


DVC_YAML = PROJECT_ROOT / "dvc.yaml"


def write_rendered(path: Path, text: str, command: str, argv: list[str]) -> int:
    """Write a file rendered from the declarations above, or with `--check` only say whether the
    committed one is up to date (exit 1 if not)."""
    if argv == ["--check"]:
        same = path.exists() and path.read_text(encoding="utf-8") == text
        print(f"{path.name} is up to date" if same else
              f"{path.name} differs from tasks/stages.py: run `{command}`")
        return 0 if same else 1
    write_text(path, text)
    print(f"wrote {path}")
    return 0


def main(argv: list[str]) -> int:
    return write_rendered(DVC_YAML, render_dvc_yaml(), "python -m tasks.stages", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
