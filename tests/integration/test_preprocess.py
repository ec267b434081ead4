"""`clap preprocess` on the shared local Ray: every input accounted for, S3 output, exact resume.

The S3 tests run against moto's S3 server on 127.0.0.1 (real HTTP, pyarrow's S3 filesystem), not
mocked calls. The resume test crashes a run after two committed units, turns every other committed unit into
the debris a crash between a shard and its marker leaves, resumes, and compares row by row with an
uninterrupted run (ids, audio bytes, augmentation records, captions).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import boto3
import pytest

from clap_core import storage
from clap_core.audio.codec import decode_flac
from clap_core.data.shards import SHARD_SCHEMA, committed_rejects, read_shards
from clap_core.preprocess.config import load_preprocess_config
from clap_demo.synth import write_bad_inputs, write_corpus
from pipelines.preprocess import SimulatedCrash, preprocess

pytestmark = pytest.mark.integration

FAST = ["ray.concurrency=2", "output.rows_per_unit=4"]


def config(*overrides: str):
    return load_preprocess_config(None, [*FAST, *overrides])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """18 short clips in five formats, rates 16-48 kHz, mono and stereo (speech and env)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), 18, seed=3, seconds=(0.6, 1.2))


def upload_folder(folder: Path, bucket: str, prefix: str) -> str:
    s3 = boto3.client("s3")
    for path in folder.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def rows_by_id(out_uri: str) -> dict[str, dict]:
    rows = read_shards(out_uri).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate rows in the output"
    return {r["id"]: r for r in rows}


def test_bad_input_zoo_every_row_accounted_for(ray_local, tmp_path):
    expected = write_bad_inputs(tmp_path / "zoo", min_seconds=0.5, max_seconds=30.0)
    out = str(tmp_path / "out")
    manifest = preprocess(str(tmp_path / "zoo" / "manifest.csv"), out, config("audio.long_clip=reject"))

    rejects = committed_rejects(out).to_pylist()
    output = read_shards(out).to_pylist()
    print(f"\nzoo: in {manifest['rows_in']} = out {manifest['sources_out']} + rejects {len(rejects)}; "
          f"reasons {manifest['rejects']['by_reason']}")
    assert manifest["rows_in"] == len(expected) == manifest["sources_out"] + len(rejects)
    want = sorted((e["id"], e["expected_reason"]) for e in expected if e["expected_reason"])
    assert sorted((r["id"], r["reason"]) for r in rejects) == want
    assert sorted(r["id"] for r in output) == ["dup", "ok-8k"]
    assert all(r["sample_rate"] == 48_000 and decode_flac(r["audio"])[1] == 48_000 for r in output)
    assert read_shards(out).schema.equals(SHARD_SCHEMA)


def test_full_run_from_and_to_s3(ray_local, s3_bucket, corpus):
    input_uri = upload_folder(corpus.parent, s3_bucket, "raw") + "/manifest.jsonl"
    out = f"s3://{s3_bucket}/shards"
    manifest = preprocess(input_uri, out, config())

    rows = rows_by_id(out)
    source_ids = {line.split('"id": "')[1].split('"')[0] for line in corpus.read_text().splitlines()}
    assert set(rows) == source_ids and manifest["rejects"]["rows"] == 0
    for split, info in manifest["splits"].items():
        assert info["rows"] == len(read_shards(out, split))
    row = next(iter(rows.values()))
    wave, sr = decode_flac(row["audio"])
    assert sr == 48_000 and wave.shape == (1, row["num_samples"]) and row["source_path"].startswith("audio/")
    keys = storage.list_files(out)
    assert f"{out}/manifest.json" in keys and not [k for k in keys if storage.TEMP_PREFIX in k]
    assert len([k for k in keys if k.endswith(".parquet")]) == len(manifest["shards"])
    text = storage.read_bytes(f"{out}/manifest.json").decode()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text


def settled_markers(done_uri: str, quiet_s: float = 3.0, limit_s: float = 60.0) -> list[str]:
    """The unit markers once no new one has appeared for quiet_s: actors that were mid-unit when the driver
    crashed are stopped asynchronously and may still commit the unit they were writing. An actor killed in
    the middle of a local write leaves a temp file in _done/: it is no marker (the re-run deletes it)."""
    def committed() -> list[str]:
        return [f for f in storage.list_files(done_uri) if not f.rsplit("/", 1)[-1].startswith(storage.TEMP_PREFIX)]

    deadline = time.monotonic() + limit_s
    seen, since = committed(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.5)
        now = committed()
        if now != seen:
            seen, since = now, time.monotonic()
    return seen


def test_interrupted_then_resumed_equals_clean_run(ray_local, s3_bucket, corpus):
    every_split = "augment.splits=[train, valid, test]"  # a copy of every clip: 2 rows per source
    cfg = config("augment.copies=1", every_split)
    clean, resumed = f"s3://{s3_bucket}/clean", f"s3://{s3_bucket}/resumed"
    preprocess(str(corpus), clean, cfg)

    with pytest.raises(SimulatedCrash):
        preprocess(str(corpus), resumed, config("augment.copies=1", every_split, "debug.crash_after_units=2"))
    assert not storage.exists(f"{resumed}/manifest.json")
    done = settled_markers(f"{resumed}/_done")
    assert 2 <= len(done)
    # Units still in flight may have committed before the crash stopped them; drop all but two markers
    # so their committed shards become the debris of a crash between shard and marker, plus a stray file.
    for marker in done[2:]:
        storage.delete(marker)
    storage.put_atomic(f"{resumed}/train/part-09999-000.parquet", b"partial")
    manifest = preprocess(str(corpus), resumed, cfg)

    assert manifest["run"]["units_processed"] == manifest["units"] - 2 > 0
    assert not storage.exists(f"{resumed}/train/part-09999-000.parquet")
    a, b = rows_by_id(clean), rows_by_id(resumed)
    assert sorted(a) == sorted(b) and len(a) == 2 * manifest["sources_out"]
    for row_id in a:
        assert a[row_id]["audio"] == b[row_id]["audio"], row_id
        assert a[row_id]["augment"] == b[row_id]["augment"] and a[row_id]["caption"] == b[row_id]["caption"]
    assert any(r["augment"] != "{}" for r in a.values())
    assert preprocess(str(corpus), resumed, cfg)["run"]["units_processed"] == 0  # finished: nothing to redo
