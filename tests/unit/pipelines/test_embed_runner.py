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
    assert choose_runner("auto", None, cluster_options=False) == "ray"  # a shard folder: Ray Data reads it
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


def test_an_explicit_runner_is_honoured_or_refused_clearly(no_cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert choose_runner("local", LOCAL_MAX_ROWS * 10, cluster_options=True) == "local"
    monkeypatch.delenv("RAY_ADDRESS")
    assert choose_runner("ray", 1, cluster_options=False) == "ray"
    with pytest.raises(ConfigError, match="a shard folder is read by Ray Data"):
        choose_runner("local", None, cluster_options=False)
    with pytest.raises(ConfigError, match="choose one of auto, ray, local"):
        choose_runner("spark", 1, cluster_options=False)
