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
