"""tasks/io.py: a missing Parquet input is named whole, however long its path."""

from __future__ import annotations

import polars as pl
import pytest

from tasks import io


def test_a_missing_parquet_file_is_named_by_its_whole_path(tmp_path):
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 6) / "items.parquet"
    with pytest.raises(FileNotFoundError) as err:
        pl.read_parquet(deep)
    assert str(deep) not in str(err.value)  # polars shortens it: the reason for io.read_parquet
    for read in (io.read_parquet, io.parquet_rows):
        with pytest.raises(FileNotFoundError, match="does not exist") as err:
            read(deep)
        assert str(deep) in str(err.value)


def test_read_parquet_and_parquet_rows_read_what_write_parquet_wrote(tmp_path):
    frame = pl.DataFrame({"user_id": [3, 1, 2], "rank": [0, 5, 1]})
    io.write_parquet(tmp_path / "f.parquet", frame)
    assert io.read_parquet(tmp_path / "f.parquet").equals(frame)
    assert io.read_parquet(tmp_path / "f.parquet", columns=["rank"])["rank"].to_list() == [0, 5, 1]
    assert io.parquet_rows(tmp_path / "f.parquet") == 3


def test_safetensors_metadata_is_written_in_one_order_whatever_the_process(tmp_path):
    """safetensors orders metadata keys by a per-process hash; write_safetensors sorts them, so the
    same tensors and metadata give the same bytes in every process, and the file reads back."""
    import subprocess
    import sys

    import numpy as np

    code = ("import sys, numpy as np; from tasks import io; "
            "io.write_safetensors(sys.argv[1], {'e': np.arange(6, dtype=np.float32).reshape(2, 3)}, "
            "{'skipped': 'False', 'model': 'm', 'dim': '3', 'zeta': 'é'})")
    files = []
    for seed in range(6):  # PYTHONHASHSEED does not reach Rust's hasher: several processes, several orders
        out = tmp_path / f"{seed}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=tmp_path.parent,
                       env={"PYTHONPATH": str(__import__("tasks").__path__[0].rsplit("/", 1)[0])})
        files.append(out.read_bytes())
    assert len(set(files)) == 1
    tensors, meta = io.read_safetensors(tmp_path / "0.safetensors")
    assert meta == {"skipped": "False", "model": "m", "dim": "3", "zeta": "é"}
    assert np.array_equal(tensors["e"], np.arange(6, dtype=np.float32).reshape(2, 3))
