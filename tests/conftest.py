"""Shared fixtures: tiny source datasets written into tmp_path, and params that point at them.

The default datasets are small enough to check by hand. Tests that assert exact ids write
their own data through the same factories, so the expected values sit next to the input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# Source item ids 7, 9, 40, 100 -> dense 0, 1, 2, 3; users 1, 2, 10 -> dense 0, 1, 2.
LCREC_ITEMS: dict[str, dict[str, Any]] = {
    "7": {"title": "Pipette", "description": "10 ul", "brand": "Acme", "categories": "Lab,Tools,Pipettes"},
    "9": {"title": "Beaker", "brand": "Zeta", "categories": "Lab,Glass"},
    "40": {"title": "Flask", "brand": "Acme", "categories": "Lab,Glass"},
    "100": {"title": "Scale", "brand": "  ", "categories": "Lab"},
}
LCREC_INTER: dict[str, list[int]] = {
    "2": [40, 7, 9],
    "10": [7, 9, 40, 100],
    "1": [100, 40, 7],
}

# RecBole: users 5 and 12, items 3, 7, 20; user 5 has a timestamp tie (100) at lines 3 and 5,
# with the larger item id first in the file.
RECBOLE_INTER = [
    "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "5\t20\t3\t300",
    "5\t7\t1\t100",
    "12\t3\t5\t50",
    "5\t3\t4\t100",
    "12\t20\t2\t60",
    "12\t7\t2\t70",
]
RECBOLE_ITEMS = [
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
    "3\tAlpha\t1995\tDrama Comedy",
    "7\tBeta\t1996\t",
    "20\tGamma\t1997\tAction",
]


def _write(path: Path, content: Any) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content, indent=2), encoding="utf-8")


@pytest.fixture
def write_lcrec(tmp_path: Path) -> Callable[..., Path]:
    """Write `<prefix>.inter.json`, `<prefix>.item.json` (unless items is None) and an optional index.

    Each of inter, items and index may be a dict (dumped as JSON), a str or raw bytes (written
    as is, for malformed input). Returns the folder.
    """

    def write(inter: Any = None, items: Any = "default", index: Any = None, *,
              prefix: str = "Tiny", folder: str = "lcrec", index_name: str = "Tiny.index.json") -> Path:
        root = tmp_path / folder
        root.mkdir(parents=True, exist_ok=True)
        _write(root / f"{prefix}.inter.json", LCREC_INTER if inter is None else inter)
        if items is not None:
            _write(root / f"{prefix}.item.json", LCREC_ITEMS if items == "default" else items)
        if index is not None:
            _write(root / index_name, index)
        return root

    return write


@pytest.fixture
def write_recbole(tmp_path: Path) -> Callable[..., Path]:
    """Write `<prefix>.inter` and `<prefix>.item` (unless items is None) from lists of lines or bytes."""

    def write(inter: Any = None, items: Any = "default", *, prefix: str = "tiny", folder: str = "recbole") -> Path:
        root = tmp_path / folder
        root.mkdir(parents=True, exist_ok=True)
        for suffix, content, default in (("inter", inter, RECBOLE_INTER), ("item", items, RECBOLE_ITEMS)):
            if suffix == "item" and content is None:
                continue
            if content is None or content == "default":
                content = default
            _write(root / f"{prefix}.{suffix}", content if isinstance(content, bytes) else "\n".join(content) + "\n")
        return root

    return write


@pytest.fixture
def make_params(tmp_path: Path) -> Callable[..., Any]:
    """Params from a copy of the real params.yaml, with outputs under tmp_path and dataset `tiny`."""
    from tasks.params import load_params

    def make(root: Path, *, fmt: str = "lcrec", prefix: str = "Tiny", index: str = "",
             overrides: tuple[str, ...] = ()) -> Any:
        path = tmp_path / "params.yaml"
        path.write_text((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
        spec = {"format": fmt, "path": str(root), "prefix": prefix, "attributes": ["category", "brand"]}
        if index:
            spec["index"] = index
        return load_params(path, [
            f"data.data_dir={json.dumps(str(tmp_path / 'data'))}",
            f"data.reports_dir={json.dumps(str(tmp_path / 'reports'))}",
            "data.dataset=tiny",
            f"datasets.tiny={json.dumps(spec)}",  # JSON is YAML: a flow mapping
            *overrides,
        ])

    return make


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port (benchmarks/common.py); yields its API URL and
    home. One per session, for every test directory: a start costs 10 s on a quiet machine,
    minutes beside other jobs."""
    from benchmarks.common import prefect_server as server

    try:
        with server(tmp_path_factory.mktemp("prefect-home")) as running:
            yield running
    except RuntimeError as exc:
        pytest.fail(str(exc))
