"""The stage declarations (tasks/stages.py) against dvc.yaml, the code and the fingerprints.

- dvc.yaml is exactly what the declarations render (a hand edit or a stale file fails);
- every project module a stage's flow loads at import time is one of its dvc.yaml deps;
- every params key the code of a stage's import closure reads is declared by that stage;
- changing any leaf under a declared key changes the stage's fingerprint, and runtime keys do not.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from tasks import stages
from tasks.env import PROJECT_ROOT
from tasks.params import load_params

# Params members that are not keys: what each reads.
MEMBERS = {"dataset_dir": ("data.data_dir", "data.dataset"), "reports_dir": ("data.reports_dir", "data.dataset"),
           "dataset": ("datasets", "data.dataset"), "id_source": ("tokenize.source", "datasets", "data.dataset"),
           "raw": (), "section_hash": ()}  # raw and section_hash: record metadata, checked where used


def test_dvc_yaml_is_rendered_from_the_declarations():
    assert (PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8") == stages.render_dvc_yaml(), \
        "dvc.yaml differs from tasks/stages.py: run `python -m tasks.stages`"


def test_dvc_yaml_code_deps_are_the_import_closure():
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(stages.STAGES)
    for name in stages.STAGES:
        code = {d for d in dvc[name]["deps"] if d.endswith(".py")}
        assert code == set(stages.code_files(name)), name
        assert f"flows/{name}.py" in code and "tasks/params.py" in code


def test_the_ingest_does_not_load_the_model_code():
    # params.py reads configs from grc_core/config.py, not the modules that define the models.
    assert [f for f in stages.code_files("ingest") if f.startswith("grc_core/")] == ["grc_core/__init__.py",
                                                                                    "grc_core/config.py"]


def test_stage_modules_do_not_import_each_other():
    # Shared loaders live in tasks/artifacts.py; a stage's task module is loaded by its own flow only.
    for name in stages.STAGES:
        own = f"tasks/{name}.py"
        for other in stages.STAGES:
            if other != name and own in stages.code_files(other):
                pytest.fail(f"stage {other} loads {own}")


# One interpreter imports every stage's flow module in turn, each from no project module loaded:
# the project modules of the previous stage are dropped from sys.modules first, so each import
# loads exactly what a fresh `python -c "import flows.<stage>"` loads, while torch, prefect and
# great_expectations are imported once instead of once per stage.
LOADER = """
import importlib, json, sys
def project():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("flows", "tasks", "grc_core"))
loaded = {}
for name, module in json.loads(sys.argv[1]).items():
    for m in project():
        del sys.modules[m]
    importlib.import_module(module)
    loaded[name] = project()
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def loaded_at_run_time():
    modules = {name: st.module for name, st in stages.STAGES.items()}
    out = subprocess.run([sys.executable, "-c", LOADER, json.dumps(modules)], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(stages.STAGES))
def test_every_module_loaded_at_run_time_is_a_dep(name, loaded_at_run_time):
    assert stages.STAGES[name].module in loaded_at_run_time[name]
    loaded = {str(stages.module_file(m).relative_to(PROJECT_ROOT)) for m in loaded_at_run_time[name]}
    assert loaded <= set(stages.code_files(name)), sorted(loaded - set(stages.code_files(name)))


# --- params a stage's code reads ---------------------------------------------------------------


def _key_paths(raw: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in raw.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, dict) and k != "datasets" and prefix != "datasets.":
            out |= _key_paths(v, key + ".")
    return out


def _chain(node: ast.AST) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; None for anything that is not a plain attribute chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def params_reads(path) -> set[str]:
    """Dotted params keys read in a module: through a `params` name, or a local alias of one of
    its sections (`bb = params.backbone`, `cd, ev = params.candidates, params.evaluate`)."""
    keys = _key_paths(load_params().raw)
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))] + [tree]:
        aliases, bound = {"params": ""}, set()
        for node in ast.walk(func):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                targets, values = node.targets[0], node.value
                pairs = (list(zip(targets.elts, values.elts)) if isinstance(targets, ast.Tuple)
                         and isinstance(values, ast.Tuple) else [(targets, values)])
                for t, v in pairs:
                    c = _chain(v)
                    if isinstance(t, ast.Name) and c and c[0] == "params" and len(c) > 1 and c[1] not in MEMBERS:
                        aliases[t.id] = ".".join(c[1:])
                        bound.add(id(v))  # naming a section is not reading all of it
        inner = {id(n.value) for n in ast.walk(func) if isinstance(n, ast.Attribute)}  # a.b inside a.b.c
        for node in ast.walk(func):
            if not isinstance(node, (ast.Attribute, ast.Name)) or id(node) in inner | bound:
                continue
            c = _chain(node)
            if not c or c[0] not in aliases or len(c) == 1:
                continue
            parts = ([p for p in aliases[c[0]].split(".") if p]) + c[1:]
            if parts and parts[0] in MEMBERS and not aliases[c[0]]:
                found.update(MEMBERS[parts[0]])
                continue
            while parts and ".".join(parts) not in keys:  # drop methods and fields of non-param objects
                parts = parts[:-1]
            if parts:
                found.add(".".join(parts))
    return found


def _covered(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_a_stage_declares_every_params_key_its_code_reads(name):
    st = stages.STAGES[name]
    declared = st.params + st.runtime + st.per_item + stages.LOCATION
    reads = {}
    for rel in stages.code_files(name):
        for key in params_reads(PROJECT_ROOT / rel):
            reads.setdefault(key, rel)
    missing = {k: where for k, where in reads.items() if not _covered(k, declared)}
    assert not missing, f"{name} reads undeclared params: {missing}"


def test_the_reads_checker_sees_aliases_and_members(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f(params):\n    bb, out = params.backbone, params.dataset_dir()\n"
                   "    x = bb.train.lr + params.mine.beam\n    return params.dataset.attributes, bb.model\n")
    assert params_reads(src) == {"backbone.train.lr", "mine.beam", "data.data_dir", "data.dataset", "datasets",
                                 "backbone.model"}


# --- fingerprints ------------------------------------------------------------------------------


def _leaves(raw: dict, key: str) -> list[str]:
    value = stages.param_value(raw, key)
    if not isinstance(value, dict):
        return [key]
    prefix = f"datasets.{raw['data']['dataset']}" if key == "datasets" else key
    return [leaf for k in value for leaf in _leaves_under(value[k], f"{prefix}.{k}")]


def _leaves_under(value, key: str) -> list[str]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves_under(v, f"{key}.{k}")]
    return [key]


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if value else ["x"]
    raise AssertionError(f"no rule to change {value!r}")


def _with(params, leaf: str):
    raw = copy.deepcopy(params.raw)
    node = raw
    *path, last = leaf.split(".")
    for part in path:
        node = node[part]
    node[last] = _changed(node[last])
    return dataclasses.replace(params, raw=raw)


@pytest.fixture
def project(tmp_path):
    params = load_params(overrides=[f"data.data_dir={tmp_path}"])
    for name in stages.STAGES:
        for rel in stages.STAGES[name].inputs:
            path = params.dataset_dir() / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if "." in path.name:
                path.write_text(rel)
            else:
                path.mkdir(exist_ok=True)
                (path / "part.bin").write_text(rel)
    return params


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_every_declared_param_changes_the_fingerprint(project, name):
    st = stages.STAGES[name]
    base = stages.fingerprint(project, name)
    assert stages.fingerprint(project, name) == base  # deterministic
    leaves = [leaf for key in st.params for leaf in _leaves(project.raw, key)]
    assert leaves
    for leaf in leaves:
        assert stages.fingerprint(_with(project, leaf), name) != base, f"{name}: {leaf} does not change it"
    ds = project.raw["data"]["dataset"]
    location = [f"datasets.{ds}.{k}" for k in stages.SOURCE_LOCATION if k in project.raw["datasets"][ds]]
    assert location  # ml-100k has both
    for leaf in st.runtime + st.per_item + tuple(location):
        assert stages.fingerprint(_with(project, leaf), name) == base, f"{name}: {leaf} changes it"


def test_the_fingerprint_follows_inputs_and_extras(project):
    base = stages.fingerprint(project, "backbone")
    tokenizer = project.dataset_dir() / "tokenizer" / "part.bin"
    tokenizer.write_text("other codes")
    assert stages.fingerprint(project, "backbone") != base
    assert stages.fingerprint(project, "sft", extra={"variant": "grc"}) != \
        stages.fingerprint(project, "sft", extra={"variant": "gc"})
    (project.dataset_dir() / "splits" / ".part.bin.x.tmp").write_text("a killed write")  # not part of the data
    changed = stages.fingerprint(project, "backbone")
    (project.dataset_dir() / "splits" / ".part.bin.x.tmp").unlink()
    assert stages.fingerprint(project, "backbone") == changed


def test_a_missing_input_is_named(tmp_path):
    params = load_params(overrides=[f"data.data_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="splits does not exist"):
        stages.fingerprint(params, "backbone")


def test_parse_source_retries_cpythons_spurious_recursion_depth_error(monkeypatch):
    """CPython 3.11 (gh-106905) can raise this SystemError from ast.parse when another thread
    compiles at the same time; parse_source retries it, and only it."""
    import ast

    from tasks import stages

    real, calls = ast.parse, []

    def flaky(text, *args, **kwargs):
        calls.append(text)
        if len(calls) < 3:
            raise SystemError("AST constructor recursion depth mismatch (before=45, after=72)")
        return real(text, *args, **kwargs)

    monkeypatch.setattr(stages.ast, "parse", flaky)
    assert isinstance(stages.parse_source("import os"), ast.Module) and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(stages.ast, "parse", lambda text: (_ for _ in ()).throw(SystemError("another")))
    with pytest.raises(SystemError, match="another"):
        stages.parse_source("import os")


def test_an_ignored_param_leaves_the_fingerprint_and_only_a_declared_one_can_be_ignored(project):
    base = stages.fingerprint(project, "sasrec", ignore=("sasrec_ensemble",))
    for leaf in _leaves(project.raw, "sasrec_ensemble"):
        assert stages.fingerprint(_with(project, leaf), "sasrec", ignore=("sasrec_ensemble",)) == base, leaf
    for leaf in _leaves(project.raw, "sasrec"):
        assert stages.fingerprint(_with(project, leaf), "sasrec", ignore=("sasrec_ensemble",)) != base, leaf
    with pytest.raises(ValueError, match=r"\['backbone'\] are not params of stage 'sasrec'"):
        stages.fingerprint(project, "sasrec", ignore=("backbone",))
