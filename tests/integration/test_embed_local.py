"""`clap embed`'s in-process runner (pipelines.embed_local) writes the output the Ray job writes; a manifest too big to
hold (pipelines.embed_input) gives the output of one read whole."""
import csv
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from clap_core.data import embeddings
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from pipelines import embed_local
from pipelines.embed import embed_manifest
from tests.fixtures.shards import TONES, tone

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A tiny checkpoint and a manifest of 6 clips (16 kHz and 48 kHz, 0.5-2 s), a missing file, a broken one and
    a duplicate id."""
    root = tmp_path_factory.mktemp("local")
    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(root / "ckpt")
    (root / "audio").mkdir()
    rows = []
    for i, (label, freq) in enumerate(list(TONES.items()) * 2):
        rate = 16_000 if i % 2 else 48_000
        sf.write(root / "audio" / f"{i}.wav", tone(freq, 0.5 + 0.3 * i), rate)
        rows.append({"id": f"clip{i}", "audio_path": f"audio/{i}.wav", "caption": f"a {label}", "label": label})
    (root / "audio" / "broken.wav").write_bytes(b"RIFF....not really")
    rows += [{"id": "gone", "audio_path": "audio/missing.wav", "caption": "x"},
             {"id": "broken", "audio_path": "audio/broken.wav", "caption": "y"},
             {"id": "clip0", "audio_path": "audio/1.wav", "caption": "a second clip0"}]
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_in_process_output_equals_the_ray_jobs(ray_local, manifest, tmp_path, monkeypatch):
    ckpt, rows = str(manifest / "ckpt"), str(manifest / "m.jsonl")
    ray_out, local_out = str(tmp_path / "ray"), str(tmp_path / "local")
    ray_summary = embed_manifest(ckpt, rows, ray_out, batch_size=2)  # Ray is up in this process: auto is ray
    monkeypatch.setattr(embed_local, "ROWS_PER_FILE", 4)  # 6 rows: two data files
    local_summary = embed_manifest(ckpt, rows, local_out, batch_size=2, runner="local")

    expected = {"rows": 6, "rejects": 3, "reject_reasons": {"missing_file": 1, "undecodable": 1, "duplicate_id": 1}}
    assert ray_summary == local_summary == expected
    index = embeddings.read_index(local_out)
    assert index["state"] == "complete" and [f["rows"] for f in sorted(index["files"], key=lambda f: f["path"])] \
        == [4, 2]
    assert all(f["path"].startswith(f"data/{index['attempt']}_local_") for f in index["files"])
    by_ray, by_local = embeddings.read_table(ray_out), embeddings.read_table(local_out)
    assert by_local.column_names == by_ray.column_names
    for column in by_ray.column_names:
        if column.endswith("_embedding"):  # the same model on the same batches
            np.testing.assert_allclose(embeddings.embedding_matrix(by_local, column),
                                       embeddings.embedding_matrix(by_ray, column), atol=1e-6, rtol=0)
        else:
            assert by_local.column(column).to_pylist() == by_ray.column(column).to_pylist(), column
    reference = ClapModel.from_pretrained(ckpt).embed_audio(str(manifest / "audio" / "4.wav"), precision="auto")
    row = by_local.column("id").to_pylist().index("clip4")
    np.testing.assert_allclose(embeddings.embedding_matrix(by_local, "audio_embedding")[row], reference[0],
                               atol=1e-5, rtol=0)

    def rejects(out):
        return sorted((r["id"], r["reason"]) for r in embeddings.read_rejects(out).to_pylist())

    assert rejects(local_out) == rejects(ray_out) == [("broken", "undecodable"), ("clip0", "duplicate_id"),
                                                     ("gone", "missing_file")]
    # the same job again (another batch size changes nothing): the finished output stands, written once
    assert embed_manifest(ckpt, rows, local_out, batch_size=4, runner="local") == expected
    assert embeddings.read_index(local_out)["attempt"] == index["attempt"]


def test_clap_embed_without_a_cluster_never_starts_ray(manifest, tmp_path):
    """The command a user types on a laptop: a small manifest, no RAY_ADDRESS. Ray is not even imported."""
    script = ("import sys\nfrom pipelines import cli\n"
              f"rc = cli.main(['embed', '--checkpoint', 'ckpt', '--input', 'm.jsonl', '--output', {str(tmp_path / 'e')!r},"
              " '--batch-size', '4'])\n"
              "print('ray imported:', 'ray' in sys.modules)\nsys.exit(rc)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path / "ray-tmp")  # no `ray start` cluster's address there
    proc = subprocess.run([sys.executable, "-c", script], cwd=manifest, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 rows, no Ray cluster given: embedding in this process" in proc.stderr
    assert f"clap embed: logs in {tmp_path / 'e' / 'logs' / 'clap-embed.log'}" in proc.stderr
    lines = proc.stdout.splitlines()
    assert json.loads(lines[-2]) == {"rows": 6, "rejects": 3,
                                     "reject_reasons": {"missing_file": 1, "undecodable": 1, "duplicate_id": 1}}
    assert lines[-1] == "ray imported: False"
    assert len(embeddings.read_table(str(tmp_path / "e"))) == 6


def test_in_process_runner_reads_and_writes_object_storage(manifest, s3_bucket, tmp_path):
    """A manifest, its audio and the output on S3 (the moto server): the in-process runner reads the audio
    through the same sources and writes the same files as in a local folder."""
    import boto3

    s3 = boto3.client("s3")
    for path in sorted((manifest / "audio").iterdir()):
        s3.upload_file(str(path), s3_bucket, f"corpus/audio/{path.name}")
    s3.upload_file(str(manifest / "m.jsonl"), s3_bucket, "corpus/m.jsonl")
    local = embed_manifest(str(manifest / "ckpt"), str(manifest / "m.jsonl"), str(tmp_path / "local"),
                           batch_size=3, runner="local")
    remote_out = f"s3://{s3_bucket}/emb"
    remote = embed_manifest(str(manifest / "ckpt"), f"s3://{s3_bucket}/corpus/m.jsonl", remote_out, batch_size=3,
                            runner="local")
    assert remote == local and remote["rows"] == 6
    by_local, by_remote = embeddings.read_table(str(tmp_path / "local")), embeddings.read_table(remote_out)
    assert by_remote.column("id").to_pylist() == by_local.column("id").to_pylist()
    np.testing.assert_allclose(embeddings.embedding_matrix(by_remote, "audio_embedding"),
                               embeddings.embedding_matrix(by_local, "audio_embedding"), atol=1e-6, rtol=0)
    assert sorted(embeddings.read_rejects(remote_out).column("reason").to_pylist()) == [
        "duplicate_id", "missing_file", "undecodable"]


def test_a_small_shard_split_is_embedded_in_process_as_the_ray_job_embeds_it(ray_local, manifest, tmp_path,
                                                                             monkeypatch):
    """`clap embed --input SHARDS --split test` (the flow after `clap pretrain`): auto counts the split's rows
    from the shard index and embeds them in process, streamed from the Parquet files, when no cluster is given."""
    from pipelines.embed import embed_dataset
    from tests.fixtures.shards import write_shards

    write_shards(tmp_path / "shards", per_label=2, split="train")
    test_rows = write_shards(tmp_path / "shards", per_label=3, split="test", corrupt=1)
    ckpt, shards = str(manifest / "ckpt"), str(tmp_path / "shards")
    assert embed_local.shard_rows(shards, "test") == len(test_rows) == 10
    by_ray = embed_dataset(ckpt, shards, str(tmp_path / "ray"), split="test", batch_size=4)
    monkeypatch.setattr(embed_local, "ray_addressed", lambda: False)  # as on a machine with no Ray running
    by_local = embed_dataset(ckpt, shards, str(tmp_path / "local"), split="test", batch_size=4)
    assert by_local == by_ray == {"rows": 9, "rejects": 1, "reject_reasons": {"undecodable": 1}}
    assert all("_local_" in f["path"] for f in embeddings.read_index(str(tmp_path / "local"))["files"])
    ray_table, local_table = embeddings.read_table(str(tmp_path / "ray")), embeddings.read_table(str(tmp_path / "local"))
    assert local_table.column_names == ray_table.column_names
    assert local_table.column("id").to_pylist() == sorted(r["id"] for r in test_rows if r["id"] != "corrupt-0")
    assert embeddings.read_rejects(str(tmp_path / "local")).column("id").to_pylist() == ["corrupt-0"]
    for column in ray_table.column_names:
        if column.endswith("_embedding"):
            np.testing.assert_allclose(embeddings.embedding_matrix(local_table, column),
                                       embeddings.embedding_matrix(ray_table, column), atol=1e-6, rtol=0)
        else:
            assert local_table.column(column).to_pylist() == ray_table.column(column).to_pylist(), column


def test_a_manifest_too_big_to_hold_is_read_a_chunk_at_a_time_into_the_same_output(ray_local, manifest, tmp_path,
                                                                                   monkeypatch):
    """Past IN_DRIVER_MANIFEST_BYTES no process holds the manifest: Ray tasks count, group by id and read it a
    chunk at a time (the in-process runner: chunk after chunk). Chunks of ~150 bytes cut lines mid-way and put the
    repeats of an id in other chunks than its first row: the rows, the embeddings and every reject (duplicates,
    a line that is not JSON with its line number, a missing file) equal those of the manifest read whole."""
    from pipelines import embed_input
    from pipelines.embed import embed_dataset

    lines = (manifest / "m.jsonl").read_text().splitlines()
    lines += ["{not json", json.dumps({"audio_path": "audio/5.wav", "caption": "no id: named by its path"}),
              json.dumps({"id": "clip3", "audio_path": "audio/2.wav", "caption": "clip3 again"}), "",
              json.dumps({"id": "clip0", "audio_path": "audio/3.wav", "caption": "clip0, a third time"})]
    big = manifest / "big.jsonl"
    big.write_text("\n".join(lines) + "\n")
    ckpt = str(manifest / "ckpt")
    # fp32: the Ray job batches other rows together, and bf16 GEMMs differ in the last bits with their batch
    run = functools.partial(embed_dataset, ckpt, str(big), batch_size=2, precision="fp32")
    whole = run(str(tmp_path / "whole"), runner="local")
    monkeypatch.setattr(embed_input, "IN_DRIVER_MANIFEST_BYTES", 500)
    monkeypatch.setattr(embed_input, "CHUNK_MB", 150 / 1e6)
    assert embed_input.open_input(str(big), None).items is None and big.stat().st_size > 500
    by_ray = run(str(tmp_path / "ray"))  # Ray is up in this process: auto is ray
    by_local = run(str(tmp_path / "local"), runner="local")
    assert whole == by_ray == by_local == {"rows": 7, "rejects": 6, "reject_reasons": {
        "missing_file": 1, "undecodable": 1, "duplicate_id": 3, "bad_manifest_row": 1}}

    tables, rejects = same_outputs(tmp_path, ("whole", "ray", "local"))
    assert tables[0].column("id").to_pylist() == sorted([f"clip{i}" for i in range(6)] + ["audio/5"])
    captions = dict(zip(tables[0].column("id").to_pylist(), tables[0].column("caption").to_pylist()))
    assert (captions["clip0"], captions["clip3"]) == (json.loads(lines[0])["caption"], json.loads(lines[3])["caption"])
    assert [r[3][:8] for r in rejects if r[2] == "bad_manifest_row"] == ["line 10:"]  # numbered in chunks too


def same_outputs(tmp_path, names: tuple[str, ...]):
    """(tables, rejects) of the first output, having checked that the others hold the same rows, columns,
    embeddings (within 1e-6) and rejects (id, stage, reason, detail)."""
    tables = [embeddings.read_table(str(tmp_path / name)) for name in names]
    for table in tables[1:]:
        assert table.column_names == tables[0].column_names
        for column in table.column_names:
            if column.endswith("_embedding"):
                np.testing.assert_allclose(embeddings.embedding_matrix(table, column),
                                           embeddings.embedding_matrix(tables[0], column), atol=1e-6, rtol=0)
            else:
                assert table.column(column).to_pylist() == tables[0].column(column).to_pylist(), column
    rejects = [sorted((r["id"], r["stage"], r["reason"], r["detail"])
                      for r in embeddings.read_rejects(str(tmp_path / name)).to_pylist()) for name in names]
    assert all(r == rejects[0] for r in rejects[1:])
    return tables, rejects[0]


def test_a_big_csv_manifest_is_cut_where_records_end_into_the_same_output(ray_local, manifest, tmp_path,
                                                                         monkeypatch):
    """A CSV past IN_DRIVER_MANIFEST_BYTES is cut into ranges that end where records end (captions over several
    lines, quotes inside them), read by Ray tasks (or chunk after chunk in process): the same rows, embeddings and
    rejects as the CSV read whole."""
    from clap_core.data.input_chunks import input_chunks
    from pipelines import embed_input
    from pipelines.embed import embed_dataset

    records = [json.loads(line) for line in (manifest / "m.jsonl").read_text().splitlines()]
    big = manifest / "big.csv"
    with big.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "audio_path", "caption"])
        for i, r in enumerate(records):
            writer.writerow([r["id"], r["audio_path"], r["caption"] + ('\nsaid "twice",\r\nthen' if i % 2 else "")])
        f.write("clip9,audio/2.wav,a 12\" record\nclip10,audio/3.wav,ragged,row\n")
    run = functools.partial(embed_dataset, str(manifest / "ckpt"), str(big), batch_size=2, precision="fp32")
    whole = run(str(tmp_path / "whole"), runner="local")
    monkeypatch.setattr(embed_input, "IN_DRIVER_MANIFEST_BYTES", 300)
    monkeypatch.setattr(embed_input, "CHUNK_MB", 60 / 1e6)
    assert embed_input.open_input(str(big), None).items is None and big.stat().st_size > 400
    chunks = input_chunks(str(big), embed_input.CHUNK_MB)
    assert len(chunks) > 3 and {c["kind"] for c in chunks} == {"csv"}
    by_ray = run(str(tmp_path / "ray"))
    by_local = run(str(tmp_path / "local"), runner="local")  # the in-process runner: chunk after chunk
    assert whole == by_ray == by_local == {"rows": 7, "rejects": 4, "reject_reasons": {
        "missing_file": 1, "undecodable": 1, "duplicate_id": 1, "ragged_row": 1}}
    tables, rejects = same_outputs(tmp_path, ("whole", "ray", "local"))
    captions = dict(zip(tables[0].column("id").to_pylist(), tables[0].column("caption").to_pylist()))
    assert captions["clip1"] == 'a ' + records[1]["label"] + '\nsaid "twice",\r\nthen'
    assert captions["clip9"] == 'a 12" record'
    assert [r[3] for r in rejects if r[2] == "ragged_row"] == ["line 20 has 4 fields, the header 3"]  # 1 + 9 + 4 x 2


def test_a_big_sidecar_folder_is_read_in_parts_into_the_same_output(ray_local, manifest, tmp_path, monkeypatch):
    """A folder of audio + caption sidecars with more audio files than SIDECAR_CHUNK_CLIPS is listed once and read
    in parts of that many files by Ray tasks (or part after part in process): the same rows, embeddings and rejects
    (a missing caption, a broken file, an id repeated in another part) as the folder read by the driver."""
    import shutil

    from clap_core.data import input_folders
    from clap_core.data.input_chunks import input_chunks
    from pipelines import embed_input
    from pipelines.embed import embed_dataset

    folder = tmp_path / "corpus"
    shutil.copytree(manifest / "audio", folder)
    for i in range(6):
        if i != 4:  # 4.wav: missing_caption
            fields = {"caption": f"clip {i}", **({"id": "same"} if i in (0, 5) else {})}  # 5 repeats 0's id
            (folder / f"{i}.json").write_text(json.dumps(fields))
    (folder / "broken.txt").write_text("a broken file")
    run = functools.partial(embed_dataset, str(manifest / "ckpt"), str(folder), batch_size=2, precision="fp32")
    whole = run(str(tmp_path / "whole"), runner="local")
    monkeypatch.setattr(input_folders, "SIDECAR_CHUNK_CLIPS", 2)
    assert embed_input.open_input(str(folder), None).items is None
    assert [len(c["audio"]) for c in input_chunks(str(folder), embed_input.CHUNK_MB)] == [2, 2, 2, 1]
    by_ray = run(str(tmp_path / "ray"))
    by_local = run(str(tmp_path / "local"), runner="local")
    assert whole == by_ray == by_local == {"rows": 4, "rejects": 3, "reject_reasons": {
        "missing_caption": 1, "undecodable": 1, "duplicate_id": 1}}
    tables, _ = same_outputs(tmp_path, ("whole", "ray", "local"))
    assert tables[0].column("id").to_pylist() == ["1", "2", "3", "same"]
