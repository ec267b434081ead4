"""pipelines/ray_shards.py on the shared local Ray: shard files as a Ray Dataset, read by Ray Data's V1 Parquet
reader (footers read once, when the dataset is created; a repeated file read as often as it is given)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clap_core.data.shards import SHARD_SCHEMA
from pipelines.ray_shards import read_shards
from tests.fixtures.shards import shard_row, tone

pytestmark = pytest.mark.integration


def operator_names(ds) -> set[str]:
    ops, names = [ds._logical_plan.dag], set()  # noqa: SLF001 (no public accessor for the plan)
    while ops:
        op = ops.pop()
        names.add(type(op).__name__)
        ops.extend(op.input_dependencies)
    return names


def test_read_shards_reads_each_file_once_per_repeat_without_listing_at_execution(ray_local, tmp_path, capfd):
    rows = []
    for part in range(3):
        part_rows = [shard_row(f"clip-{part}-{i}", tone(220.0 * (i + 1), 0.1), f"tone {i}", "tone", "train")
                     for i in range(4)]
        pq.write_table(pa.Table.from_pylist(part_rows, schema=SHARD_SCHEMA), tmp_path / f"part-{part}.parquet")
        rows += part_rows
    uris = [str(tmp_path / f"part-{part}.parquet") for part in range(3)]
    ctx = ray_local.data.DataContext.get_current()
    assert ctx.use_datasource_v2  # Ray's default, which lists files at every execution and reads a repeat once

    ctx.enable_progress_bars = True  # as a command's console has it (one bar per dataset)
    try:
        capfd.readouterr()
        ds = read_shards(uris, ["id", "caption"], include_paths=False, repeat=2)
        assert "Parquet dataset sampling" not in capfd.readouterr().err  # no bar of the reader's own
        assert ctx.use_datasource_v2 and ctx.enable_progress_bars  # restored: the process keeps its settings
    finally:
        ctx.enable_progress_bars = False  # the session's setting (tests/conftest.py)
    assert "ListFiles" not in operator_names(ds)  # no listing (FooterReader actors) per epoch
    expected = sorted([(r["id"], r["caption"]) for r in rows] * 2)
    for _ in range(2):  # every execution (an epoch) reads all of it again
        assert sorted((r["id"], r["caption"]) for r in ds.take_all()) == expected

    with_paths = read_shards(uris[:1], include_paths=True).take_all()
    assert [r["id"] for r in with_paths] == [r["id"] for r in rows[:4]]
    assert {r["path"] for r in with_paths} == {uris[0]} and set(with_paths[0]) >= set(SHARD_SCHEMA.names)
    with pytest.raises(ValueError, match="no shard files"):
        read_shards([])
