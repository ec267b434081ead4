"""A folder input is listed once per job (resolve_input) and the listing is reused: the plan's fingerprint, the
in-driver size test and the cut into chunks make no request of their own, on object storage none per file."""
from __future__ import annotations

import hashlib
import json

import pyarrow.fs as pafs

import pipelines.embed_input as embed_input
import pipelines.preprocess_plan as plan_job_module
from clap_core import storage
from clap_core.data import input_chunks as chunking
from clap_core.data import input_folders
from clap_core.data.inputs import read_inputs, resolve_input
from clap_core.preprocess import plan as planner
from clap_core.preprocess.config import load_preprocess_config
from tests.unit.preprocess.test_plan import serial_tasks


def sidecar_corpus() -> dict[str, bytes]:
    """{relative path: bytes} of a small sidecar folder: a subfolder, a JSON sidecar, a clip with no caption."""
    files = {}
    for i in range(6):
        stem = f"sub/{i}" if i % 2 else f"{i}"
        files[f"{stem}.wav"] = b"RIFF" + bytes(i)
        if i == 3:
            files[f"{stem}.json"] = json.dumps({"caption": "json caption", "split": "valid"}).encode()
        elif i != 4:
            files[f"{stem}.txt"] = f"caption {i}".encode()
    return files


def chunk_rows(chunks: list[dict]) -> list[dict]:
    counted = [chunking.count_lines(c) for c in chunks]
    return [row for chunk, first in zip(chunks, chunking.chunk_starts(chunks, counted))
            for row in chunking.read_chunk(chunk, first)]


def is_listing(request: tuple[str, str]) -> bool:
    method, path = request
    return method == "GET" and ("list-type=" in path or "prefix=" in path)


def test_an_s3_sidecar_folder_is_listed_once_and_no_file_is_asked_for_its_size(s3_bucket, s3_faults, monkeypatch):
    """On object storage (the moto server behind the fault proxy, which logs every request): resolve_input lists
    the prefix; the fingerprint, the size test and the chunks then send no request at all (before: the folder
    listed again by each, and one HEAD per file for the fingerprint); the chunks read the whole read's rows."""
    import boto3

    client = boto3.client("s3")
    for rel, data in sidecar_corpus().items():
        client.put_object(Bucket=s3_bucket, Key=f"corpus/{rel}", Body=data)
    uri = f"s3://{s3_bucket}/corpus"
    monkeypatch.setattr(input_folders, "SIDECAR_CHUNK_CLIPS", 4)  # two chunks

    s3_faults.configure()  # zero the request log
    resolved = resolve_input(uri)
    assert resolved.kind == "sidecar" and len(resolved.listing) == 11
    assert [is_listing(r) for r in s3_faults.seen] == [True]  # one page: the listing, nothing else
    fingerprint = planner.input_fingerprint(uri, resolved)
    chunks = chunking.input_chunks(uri, 1.0, resolved=resolved)
    assert embed_input.is_big_manifest(uri, resolved) and len(chunks) == 2  # 6 audio files > 4
    assert len(s3_faults.seen) == 1  # none of the three asked the store anything

    rows = chunk_rows(chunks)  # the tasks' part: the sidecars, no listing
    asked = {path.rsplit("/corpus/", 1)[1] for _, path in s3_faults.seen[1:] if "/corpus/" in path}
    assert not any(is_listing(r) for r in s3_faults.seen[1:]) and len(s3_faults.seen) > 1
    assert asked == {"0.txt", "2.txt", "sub/1.txt", "sub/3.json", "sub/5.txt"}  # never an audio file
    assert rows == read_inputs(uri) and len(rows) == 6
    assert [r["caption"] for r in rows] == ["caption 0", "caption 2", "", "caption 1", "json caption", "caption 5"]
    assert rows[4]["split"] == "valid" and rows[2]["error"][0] == "missing_caption"  # rows in listing order

    assert planner.input_fingerprint(uri) == fingerprint  # listed by itself: the same
    client.put_object(Bucket=s3_bucket, Key="corpus/2.txt", Body=b"another caption")  # another size
    assert planner.input_fingerprint(uri) != fingerprint


def test_a_local_folder_fingerprint_is_the_per_file_stat_one(tmp_path):
    """Taken from the listing, a local folder's fingerprint is the digest the per-file stats gave before (a plan
    id does not change with this version), for a sidecar folder and for a folder of manifest parts."""
    for rel, data in sidecar_corpus().items():
        (tmp_path / "side" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "side" / rel).write_bytes(data)
    (tmp_path / "parts").mkdir()
    for i in range(3):
        (tmp_path / "parts" / f"{i}.jsonl").write_text(json.dumps({"id": i, "audio_path": "x.wav"}) + "\n")
    (tmp_path / "parts" / "README.md").write_text("not a part")  # in the listing, not in the fingerprint

    def per_file_stat(files: list[str]) -> str:
        infos = pafs.LocalFileSystem().get_file_info(files)
        return hashlib.sha256(json.dumps([[i.path, i.size, i.mtime_ns] for i in infos]).encode()).hexdigest()[:16]

    side, parts = str(tmp_path / "side"), str(tmp_path / "parts")
    assert planner.input_fingerprint(side) == per_file_stat(storage.list_files(side))
    assert planner.input_fingerprint(parts) == per_file_stat([f"{parts}/{i}.jsonl" for i in range(3)])
    manifest = f"{parts}/0.jsonl"  # one file: its own stat, as before
    assert planner.input_fingerprint(manifest) == per_file_stat([manifest])


def test_one_listing_per_plan_and_per_embed_read(tmp_path, monkeypatch):
    """`clap preprocess`'s planning and `clap embed`'s in-driver read list a sidecar folder once each (before:
    four times), with the rows and plan of the separate calls."""
    folder = tmp_path / "corpus"
    for rel, data in sidecar_corpus().items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    real_list, listed = storage.list_file_stats, []
    monkeypatch.setattr(storage, "list_file_stats",
                        lambda uri, recursive=True: listed.append(uri) or real_list(uri, recursive))
    monkeypatch.setattr(plan_job_module, "run_tasks", serial_tasks)
    cfg = load_preprocess_config(None, ["output.rows_per_unit=2"])
    plan, root = plan_job_module.plan_job(str(folder), str(tmp_path / "out"), cfg)
    assert [u for u in listed if u.startswith(str(folder))] == [str(folder)]
    assert root == plan_job_module.plan_root(str(tmp_path / "out"), str(folder), cfg)  # the same plan id
    assert plan.rows_in == 6

    listed.clear()
    source = embed_input.open_input(str(folder), None)
    assert listed == [str(folder)] and not source.shards and source.duplicates == []
    assert [i["id"] for i in source.items] == [r["id"] for r in read_inputs(str(folder))]
