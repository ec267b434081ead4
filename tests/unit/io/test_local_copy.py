"""clap_core.storage.local_copy on the session's S3-protocol server: an s3:// folder is downloaded once, and again
when what is at the URI changed (a checkpoint exported again to the same place is never served stale)."""
from __future__ import annotations

from pathlib import Path

from clap_core import storage


def test_local_copy_follows_what_is_at_the_uri(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/ckpt/final"
    cache = str(tmp_path / "cache")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.yaml").write_text("dim: 8\n")
    (src / "model.safetensors").write_bytes(b"first weights")
    storage.upload(src, uri)

    first = storage.local_copy(uri, cache)
    assert Path(first, "model.safetensors").read_bytes() == b"first weights"
    assert storage.local_copy(uri, cache) == first  # unchanged: the cached copy, no second download

    (src / "model.safetensors").write_bytes(b"second weights, longer")  # the same URI written again
    storage.upload(src, uri)
    second = storage.local_copy(uri, cache)
    assert second != first and Path(second, "model.safetensors").read_bytes() == b"second weights, longer"
    assert Path(second, "config.yaml").read_text() == "dim: 8\n"
    assert storage.local_copy(str(src)) == str(src)  # a local folder is its own copy
