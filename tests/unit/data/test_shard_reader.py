"""clap_core.data.shards.iter_shard_rows, the one streaming reader of shard rows (`clap evaluate`, the in-process
`clap embed`): every row once and in order, a transient storage error resumed after the last row read, memory
bounded by a row group (ours: 64 rows) or, for another tool's huge row groups, by a batch and a page."""
from __future__ import annotations

import functools
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clap_core import io_faults
from clap_core.data import shards
from clap_core.io_faults import StorageAccessError, TransientIOError


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(shards, "retry_transient", functools.partial(io_faults.retry_transient, sleep=lambda s: None))


def write_file(path, rows: int, row_group_rows: int, value_bytes: int = 8, **options) -> list[str]:
    ids = [f"clip-{i:03d}" for i in range(rows)]
    table = pa.table({"id": ids, "audio": [os.urandom(value_bytes) for _ in ids]})
    pq.write_table(table, path, row_group_size=row_group_rows, **options)
    return ids


def failing_opens(monkeypatch, failures: list[tuple[int, BaseException]]) -> list[int]:
    """Make the n-th opening of a file yield `after` batches, then raise the given error; returns the row
    each opening started at."""
    real, starts = shards._batches_from, []

    def flaky(uri, columns, start):
        starts.append(start)
        plan = failures[len(starts) - 1] if len(starts) <= len(failures) else None
        for n, batch in enumerate(real(uri, columns, start)):
            if plan and n == plan[0]:
                raise plan[1]
            yield batch

    monkeypatch.setattr(shards, "_batches_from", flaky)
    return starts


def test_rows_stream_in_order_across_row_groups_and_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "READ_BATCH_ROWS", 3)  # batches that straddle the 5-row groups
    (tmp_path / "test").mkdir()
    ids = write_file(tmp_path / "test" / "part-0.parquet", rows=23, row_group_rows=5)
    rows = list(shards.iter_shard_rows(str(tmp_path / "test" / "part-0.parquet"), columns=["id"]))
    assert [r["id"] for r in rows] == ids and set(rows[0]) == {"id"}
    assert [r["id"] for r in shards.iter_shard_rows(str(tmp_path), "test")] == ids
    assert list(shards.iter_shard_rows(str(tmp_path), "train")) == []


def test_a_transient_error_resumes_after_the_last_row_read(tmp_path, monkeypatch, no_backoff):
    """Three reset connections mid-file: each re-opens the file at the first row not yet read (once in the
    middle of a row group), and every row comes out exactly once, in order."""
    monkeypatch.setattr(shards, "READ_BATCH_ROWS", 3)
    path = tmp_path / "part-0.parquet"
    ids = write_file(path, rows=23, row_group_rows=5)
    reset = ConnectionResetError(104, "connection reset by peer")
    starts = failing_opens(monkeypatch, [(1, reset), (2, reset), (0, reset)])
    assert [r["id"] for r in shards.iter_shard_rows(str(path))] == ids
    assert starts == [0, 3, 8, 8]  # batches of 3 and 2 rows in each 5-row group: 3 read, then 5 more, then none


def test_a_persistent_error_stops_at_once_and_a_lasting_transient_one_names_the_file(tmp_path, monkeypatch,
                                                                                      no_backoff):
    path = tmp_path / "part-0.parquet"
    write_file(path, rows=10, row_group_rows=5)
    starts = failing_opens(monkeypatch, [(1, PermissionError("AccessDenied"))])
    with pytest.raises(StorageAccessError, match="storage refused"):
        list(shards.iter_shard_rows(str(path)))
    assert starts == [0]  # not retried: the credentials will not get better
    starts = failing_opens(monkeypatch, [(0, TimeoutError("read timed out"))] * 10)
    with pytest.raises(TransientIOError, match=r"part-0.parquet \(after row 0\).*persisted after 4 attempts"):
        list(shards.iter_shard_rows(str(path)))
    assert starts == [0, 0, 0, 0]


def peak_arrow_bytes(rows) -> tuple[int, int]:
    """(the most memory Arrow held while the rows were read, the rows)."""
    base, peak, count = pa.total_allocated_bytes(), 0, 0
    for _ in rows:
        peak, count = max(peak, pa.total_allocated_bytes() - base), count + 1
    return peak, count


def test_memory_follows_a_row_group_not_the_file(tmp_path):
    """A ParquetFile asked for every row group at once pre-buffers all of them: the reader asks for one at a time."""
    path = tmp_path / "part-0.parquet"
    write_file(path, rows=640, row_group_rows=64, value_bytes=20_000, compression="none")  # 12.8 MB, 1.3 MB groups
    size = path.stat().st_size
    everything = pq.ParquetFile(path)
    assert peak_arrow_bytes(everything.iter_batches(batch_size=64))[0] > size  # the whole file held
    peak, rows = peak_arrow_bytes(shards.iter_shard_rows(str(path)))
    assert peak < size / 3 and rows == 640


def test_a_huge_row_group_is_read_page_by_page(tmp_path, monkeypatch):
    """Another tool's file with the whole file in one row group (pages of ~8 rows): read through a buffer, the
    reader holds a batch and a page, not the row group."""
    path = tmp_path / "part-0.parquet"
    write_file(path, rows=300, row_group_rows=300, value_bytes=40_000, compression="none",
               write_batch_size=8, data_page_size=1 << 18)  # 12 MB in one row group
    size = path.stat().st_size
    assert peak_arrow_bytes(shards.iter_shard_rows(str(path)))[0] > size  # under the threshold: fetched whole
    monkeypatch.setattr(shards, "WHOLE_ROW_GROUP_BYTES", 4 << 20)
    monkeypatch.setattr(shards, "READ_BUFFER_BYTES", 1 << 20)
    peak, rows = peak_arrow_bytes(shards.iter_shard_rows(str(path)))
    assert peak < size / 2 and rows == 300  # ~5 MB: a 64-row batch (2.6 MB), the buffer and a page
