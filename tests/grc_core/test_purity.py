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
