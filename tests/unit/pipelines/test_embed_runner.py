"""`clap embed --runner`: which runner auto picks (pipelines.embed_local.choose_runner)."""
import sys
import types

import pytest

from clap_core.config import ConfigError
from pipelines import embed_local
from pipelines.embed_local import LOCAL_MAX_ROWS, choose_runner


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))  # no `ray start` address file there
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))


def test_auto_runs_a_small_manifest_in_process_only_without_a_cluster(no_cluster, monkeypatch):
    assert choose_runner("auto", 64, cluster_options=False) == "local"
    assert choose_runner("auto", LOCAL_MAX_ROWS, cluster_options=False) == "local"
    assert choose_runner("auto", LOCAL_MAX_ROWS + 1, cluster_options=False) == "ray"
    assert choose_runner("auto", None, cluster_options=False) == "ray"  # rows not counted: a big shard folder
    assert choose_runner("auto", 64, cluster_options=True) == "ray"  # --concurrency, --max-workers, --gpus
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
    assert embed_local.ray_addressed() and choose_runner("auto", 64, cluster_options=False) == "ray"
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # `ray job submit` sets it for the job's driver
    assert embed_local.ray_addressed() and choose_runner("auto", 64, cluster_options=False) == "ray"


def test_auto_joins_a_cluster_that_ray_start_left_an_address_for(no_cluster, tmp_path):
    """`ray start --head` on this machine writes the address that a later ray.init() joins: auto goes there."""
    assert choose_runner("auto", 64, cluster_options=False) == "local"
    address = tmp_path / "ray-tmp" / "ray" / "ray_current_cluster"
    assert embed_local.ray_address_file() == address
    address.parent.mkdir(parents=True)
    address.write_text("127.0.0.1:6379")
    assert choose_runner("auto", 64, cluster_options=False) == "ray"


def test_an_explicit_runner_is_honoured_and_an_unknown_one_refused(no_cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert choose_runner("local", LOCAL_MAX_ROWS * 10, cluster_options=True) == "local"
    monkeypatch.delenv("RAY_ADDRESS")
    assert choose_runner("ray", 1, cluster_options=False) == "ray"
    assert choose_runner("local", None, cluster_options=False) == "local"  # streams rows it has not counted
    with pytest.raises(ConfigError, match="choose one of auto, ray, local"):
        choose_runner("spark", 1, cluster_options=False)


def test_column_batch_keeps_audio_bytes_whole():
    """Shard rows carry FLAC bytes: a numpy bytes array ('S' dtype) would drop their trailing zero bytes."""
    audio = [b"fLaC\x00\x01\x00\x00", b"fLaC\x02\x00"]
    batch = embed_local.column_batch([{"id": "a", "audio": audio[0], "n": 1, "x": None},
                                      {"id": "b", "audio": audio[1], "n": 2, "x": "y"}])
    assert list(batch["audio"]) == audio and batch["audio"].dtype == object
    assert batch["n"].dtype.kind == "i" and list(batch["n"]) == [1, 2]
    assert list(batch["x"]) == [None, "y"] and list(batch["id"]) == ["a", "b"]


def test_shard_rows_counts_small_folders_and_stops_early_on_big_ones(tmp_path, monkeypatch):
    from tests.fixtures.shards import write_shards

    write_shards(tmp_path / "shards", per_label=2, split="train")
    write_shards(tmp_path / "shards", per_label=1, split="test")
    folder = str(tmp_path / "shards")
    assert embed_local.shard_rows(folder, "train") == 6 and embed_local.shard_rows(folder, "test") == 3
    assert embed_local.shard_rows(folder, None) == 9
    monkeypatch.setattr(embed_local, "LOCAL_MAX_ROWS", 5)  # past it: not counted further, a job for Ray
    assert embed_local.shard_rows(folder, "train") is None and embed_local.shard_rows(folder, "test") == 3
    monkeypatch.setattr(embed_local, "MAX_COUNTED_FILES", 1)  # more files than that: not even opened
    assert embed_local.shard_rows(folder, None) is None


def test_shard_items_are_the_rows_the_ray_job_reads(tmp_path):
    """The in-process runner streams a split's rows through shards.iter_shard_rows (its retries and memory bound:
    tests/unit/data/test_shard_reader.py) with the Ray job's columns (embed_input.local_rows)."""
    from pipelines.embed_input import local_rows, open_input
    from tests.fixtures.shards import write_shards

    rows = write_shards(tmp_path / "shards", per_label=1, split="test")
    write_shards(tmp_path / "shards", per_label=1, split="train")
    source = open_input(str(tmp_path / "shards"), "test")
    assert source.shards and source.items is None
    items = list(local_rows(source))
    assert [item["id"] for item in items] == [row["id"] for row in rows]
    assert [item["audio"] for item in items] == [row["audio"] for row in rows]
    assert set(items[0]) == {"id", "audio", "caption", "label", "split", "source_path", "language", "kind"}


def test_shard_rows_of_a_preprocess_output_come_from_its_index(tmp_path, no_cluster):
    """A `clap preprocess` output is counted from manifest.json alone: no shard file is opened."""
    from clap_core.data import shards

    shards.write_index(str(tmp_path), {"shards": [
        {"path": "train/a.parquet", "split": "train", "rows": 1500, "bytes": 1, "seconds": 1.0},
        {"path": "test/b.parquet", "split": "test", "rows": 40, "bytes": 1, "seconds": 1.0},
        {"path": "test/c.parquet", "split": "test", "rows": 24, "bytes": 1, "seconds": 1.0}]})
    folder = str(tmp_path)  # the listed files do not exist: opening one would raise
    assert embed_local.shard_rows(folder, "test") == 64 and embed_local.shard_rows(folder, None) == 1564
    assert choose_runner("auto", embed_local.shard_rows(folder, "test"), cluster_options=False) == "local"
    assert choose_runner("auto", embed_local.shard_rows(folder, "train"), cluster_options=False) == "ray"
