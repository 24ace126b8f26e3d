"""Atomic file writes (a temp file in the same folder, fsync, then rename) and file hashes.

A reader never sees a half-written file, and a crash leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import polars as pl


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder: so the renames inside it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _finite(obj: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    write_bytes(path, (text + "\n").encode())


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def existing_file(path: str | Path) -> Path:
    """`path`, or a FileNotFoundError naming it whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def read_parquet(path: str | Path, **kwargs: Any) -> pl.DataFrame:
    """`pl.read_parquet` of one file, whose absence is a FileNotFoundError naming the whole path
    (polars shortens a long one to its last 64 characters)."""
    return pl.read_parquet(existing_file(path), **kwargs)


def parquet_rows(path: str | Path) -> int:
    """The number of rows of one Parquet file, from its metadata (same error as `read_parquet`)."""
    return pl.scan_parquet(existing_file(path)).select(pl.len()).collect().item()


def write_parquet(path: str | Path, frame: pl.DataFrame) -> None:
    with atomic_path(path) as tmp:
        # Statistics carry no timestamps, so the same frame gives the same bytes.
        frame.write_parquet(tmp, compression="zstd", statistics=True)


def write_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """numpy arrays or torch tensors -> one safetensors file (never pickle)."""
    import numpy as np
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
              for k, v in tensors.items()}
    write_bytes(path, canonical_safetensors(save(arrays, metadata=metadata)))


def canonical_safetensors(blob: bytes) -> bytes:
    """The same file with its metadata keys in sorted order. safetensors writes them from a Rust
    HashMap, in an order that changes from process to process, so two runs that computed the same
    tensors wrote different bytes (the embed stage's two keys, seen by the work-pool benchmark)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = header.get("__metadata__")
    if not meta or len(meta) < 2:
        return blob
    header["__metadata__"] = dict(sorted(meta.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # not expected: the same characters in another order
        return blob
    return blob[:8] + text + b" " * (n - len(text)) + blob[8 + n:]


def read_safetensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order);
    temp files of an interrupted write (`.*.tmp`) are left out. A missing path is an error."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; run the stage that makes it first")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp"))):
        h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
