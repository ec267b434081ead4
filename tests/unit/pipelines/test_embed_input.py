"""What `clap embed` reads (pipelines.embed_input): a manifest too big for the driver streams, a chunk at a time, the
items and duplicate verdicts of one read whole (the Ray job's chunked read: tests/integration/test_embed_local.py)."""
import json

import pytest

from clap_core.data.rejects import reject
from pipelines import embed_input
from pipelines.embed_input import DUPLICATE, local_rows, open_input


def manifest_items(uri: str, split):
    """(items, duplicates) as the driver reads them (None: streamed)."""
    source = open_input(uri, split)
    return source.items, source.duplicates


@pytest.fixture
def manifest(tmp_path):
    lines = []
    for i in range(40):
        row = {"id": f"clip{i % 31}", "audio_path": f"audio/{i}.wav", "caption": f"clip {i}",
               "split": "train" if i % 4 else "test"}
        if i == 7:
            del row["id"]  # named by its path
        lines.append(json.dumps(row))
    lines[12] = "{not json"
    lines.insert(20, "")
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("split", [None, "train"])
def test_a_big_manifest_streams_the_items_of_a_whole_read(manifest, monkeypatch, split):
    items, duplicates = manifest_items(manifest, split)
    # rows 31-39 repeat clip0-clip8, but for row 7 (no id: "audio/7"); in train, only those whose first row is too
    assert [d["id"] for d in duplicates] == (["clip0", "clip1", "clip2", "clip3", "clip4", "clip5", "clip6", "clip8"]
                                             if split is None else ["clip2", "clip3", "clip6"])
    monkeypatch.setattr(embed_input, "IN_DRIVER_MANIFEST_BYTES", 100)
    monkeypatch.setattr(embed_input, "CHUNK_MB", 97 / 1e6)  # ~30 chunks: lines and repeated ids cut apart
    assert embed_input.is_big_manifest(manifest) and manifest_items(manifest, split) == (None, [])

    streamed = list(local_rows(open_input(manifest, split)))
    assert [r for r in streamed if r["error_reason"] != DUPLICATE] == items  # every field, in input order
    marked = [r for r in streamed if r["error_reason"] == DUPLICATE]
    assert [reject(r, "read_manifest", r["error_reason"], r["error_detail"]) for r in marked] == duplicates
    bad = [r for r in items if r["error_reason"] == "bad_manifest_row"]
    assert [r["error_detail"][:8] for r in bad] == ["line 13:"]  # numbered across chunks as in one read
    assert "audio/7" in [r["id"] for r in items]


def test_a_sidecar_folder_of_more_clips_than_a_chunk_streams_the_items_of_a_whole_read(tmp_path, monkeypatch):
    """A folder of audio + sidecars is read by the driver up to SIDECAR_CHUNK_CLIPS audio files (whatever their
    bytes); a bigger one streams in parts of that many files, with the same items and duplicate verdicts."""
    from clap_core.data import input_folders

    for i in range(7):
        (tmp_path / f"{i}.wav").write_bytes(b"RIFF" + bytes(400))
        if i != 3:
            id_field = {"id": "same"} if i in (1, 5) else {}  # 5 repeats 1's id, in another chunk
            (tmp_path / f"{i}.json").write_text(json.dumps({"caption": f"caption {i}", **id_field}))
    monkeypatch.setattr(embed_input, "IN_DRIVER_MANIFEST_BYTES", 100)
    assert not embed_input.is_big_manifest(str(tmp_path))
    items, duplicates = manifest_items(str(tmp_path), None)
    assert [i["caption"] for i in items] == [f"caption {i}" if i != 3 else "" for i in range(7) if i != 5]
    assert [d["id"] for d in duplicates] == ["same"] and items[3]["error_reason"] == "missing_caption"

    monkeypatch.setattr(input_folders, "SIDECAR_CHUNK_CLIPS", 2)
    assert embed_input.is_big_manifest(str(tmp_path)) and manifest_items(str(tmp_path), None) == (None, [])
    streamed = list(local_rows(open_input(str(tmp_path), None)))
    assert [r for r in streamed if r["error_reason"] != DUPLICATE] == items
    assert [r["id"] for r in streamed if r["error_reason"] == DUPLICATE] == ["same"]


def test_a_big_manifest_on_object_storage_streams_the_same_items(manifest, s3_bucket, monkeypatch):
    """The chunks of an s3:// manifest are ranged reads (the moto server): the same items as a whole read."""
    import boto3

    boto3.client("s3").upload_file(manifest, s3_bucket, "corpus/m.jsonl")
    uri = f"s3://{s3_bucket}/corpus/m.jsonl"
    items, duplicates = manifest_items(uri, None)
    monkeypatch.setattr(embed_input, "IN_DRIVER_MANIFEST_BYTES", 100)
    monkeypatch.setattr(embed_input, "CHUNK_MB", 300 / 1e6)
    assert manifest_items(uri, None) == (None, [])
    streamed = list(local_rows(open_input(uri, None)))
    assert [r for r in streamed if r["error_reason"] != DUPLICATE] == items and len(items) == 32
    assert [r["id"] for r in streamed if r["error_reason"] == DUPLICATE] == [d["id"] for d in duplicates]


def test_a_transient_error_reads_the_chunk_again(manifest, monkeypatch):
    """A reset connection while a chunk is read is retried (a verdict on the network, never on the rows)."""
    import functools

    from clap_core import io_faults

    items, _ = manifest_items(manifest, None)
    monkeypatch.setattr(embed_input, "IN_DRIVER_MANIFEST_BYTES", 100)
    monkeypatch.setattr(embed_input, "CHUNK_MB", 300 / 1e6)
    monkeypatch.setattr(embed_input, "retry_transient",
                        functools.partial(io_faults.retry_transient, sleep=lambda s: None))
    real, calls = embed_input.read_chunk, []

    def flaky(chunk, first):
        calls.append(chunk["start"])
        if len(calls) == 2:
            raise ConnectionResetError(104, "connection reset by peer")
        return real(chunk, first)

    monkeypatch.setattr(embed_input, "read_chunk", flaky)
    streamed = list(local_rows(open_input(manifest, None)))
    assert [r for r in streamed if r["error_reason"] != DUPLICATE] == items
    assert calls[1] == calls[2] and len(calls) == len(set(calls)) + 1  # that chunk read twice, no other


def test_the_input_identity_hashes_a_manifest_a_block_at_a_time(manifest, monkeypatch):
    """The job hash covers the manifest's bytes, read a block at a time (the driver never holds the manifest):
    the same digest as the whole file's, and no whole read."""
    import hashlib

    from clap_core import storage
    from clap_core.data import embeddings

    with open(manifest, "rb") as f:
        data = f.read()
    monkeypatch.setattr(storage, "STREAM_BLOCK_BYTES", 256)
    monkeypatch.setattr(storage, "read_bytes", lambda uri: pytest.fail(f"read whole: {uri}"))
    real, sizes = storage.iter_blocks, []

    def counted(uri):
        for block in real(uri):
            sizes.append(len(block))
            yield block

    monkeypatch.setattr(storage, "iter_blocks", counted)
    assert embeddings.input_identity(str(manifest)) == hashlib.sha256(data).hexdigest()[:32]
    assert sum(sizes) == len(data) > 1000 and max(sizes) <= 256
