"""grc_core stays pure torch/numpy: no orchestration, config-file or data-quality imports."""

import ast
from pathlib import Path

FORBIDDEN = {"prefect", "dvc", "great_expectations", "yaml", "polars", "duckdb", "tasks", "flows"}
CORE = Path(__file__).resolve().parents[2] / "grc_core"


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_modules_import_no_orchestration():
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 5
    offenders = {f.name: sorted(imported_roots(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_check_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom prefect import flow\n")
    assert imported_roots(bad) & FORBIDDEN == {"prefect"}


# Calls that write or remove files; the core hands its checkpoints to a `Checkpoints` object.
WRITE_METHODS = {"write_text", "write_bytes", "save_file", "mkdir", "rmtree", "unlink", "touch", "savez",
                 "savez_compressed", "to_csv", "write_parquet", "write_csv"}
WRITE_CALLS = {"torch.save", "np.save", "os.replace", "os.rename", "os.remove", "shutil.copyfile", "shutil.copy",
               "shutil.move"}


def _dotted(node: ast.AST) -> str:
    return f"{_dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def file_writes(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        full = _dotted(node.func)
        name = full.rsplit(".", 1)[-1]
        mode = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)] + \
            [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
        if name in WRITE_METHODS or full in WRITE_CALLS or (
                name == "open" and any(isinstance(m, str) and set(m) & set("wax") for m in mode)):
            found.append(f"{path.name}:{node.lineno} {full}")
    return found


def test_core_modules_write_no_files():
    assert [w for f in sorted(CORE.glob("*.py")) for w in file_writes(f)] == []


def test_the_check_sees_a_file_write(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, shutil\nopen('x', 'w')\nopen('y')\nshutil.rmtree('d')\nos.replace(a, b)\n"
                   "'a'.replace('b', 'c')\nckpt.save('best', m, None, {})\n")
    assert file_writes(bad) == ["bad.py:2 open", "bad.py:4 shutil.rmtree", "bad.py:5 os.replace"]
