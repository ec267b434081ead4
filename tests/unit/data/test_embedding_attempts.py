"""clap_core.data.embeddings: attempt ids in file names, what a claim and a commit delete, what the index lists."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clap_core import storage
from clap_core.data import embeddings

CKPT = {"uri": "ckpt", "identity": "abc"}


def write(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"id": i, "audio_embedding": [1.0, 0.0]} for i in ids]), path)


def test_a_rerun_deletes_only_its_jobs_earlier_attempts_and_lists_only_its_own(tmp_path, monkeypatch):
    out = str(tmp_path)
    killed = embeddings.claim_output(out, "job", CKPT)["attempt"]
    write(tmp_path / "data" / f"{killed}_w_000000.parquet", ["a", "b"])
    (tmp_path / "data" / f"{storage.TEMP_PREFIX}0123456789ab-{killed}_part.parquet").write_bytes(b"half")
    write(tmp_path / "data" / "keep.parquet", ["x"])  # no attempt of this job wrote it

    claim = embeddings.claim_output(out, "job", CKPT)  # the same command again
    rerun = claim["attempt"]
    assert claim["state"] == "running" and rerun != killed and claim["attempts"] == [killed, rerun]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["keep.parquet"]

    write(tmp_path / "data" / f"{rerun}_w_000000.parquet", ["a", "b"])
    write(tmp_path / "data" / f"{killed}_w_000001.parquet", ["b"])  # the killed run's late write
    listed = []
    real_list = storage.list_files
    monkeypatch.setattr(storage, "list_files", lambda uri: listed.append(uri) or real_list(uri))
    manifest = embeddings.commit(out, rerun)
    assert sorted(listed) == sorted([embeddings.data_path(out), embeddings.rejects_folder(out)])  # each listed once
    assert [f["path"] for f in manifest["files"]] == [f"data/{rerun}_w_000000.parquet"] and manifest["rows"] == 2
    left = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert left == sorted(["keep.parquet", f"{rerun}_w_000000.parquet"])  # the late write is gone, keep.parquet not
    write(tmp_path / "data" / f"{killed}_w_000002.parquet", ["a"])  # lands after the commit: never read
    assert embeddings.read_table(out).column("id").to_pylist() == ["a", "b"]


def test_a_run_whose_output_was_claimed_again_cannot_commit(tmp_path):
    out = str(tmp_path)
    first = embeddings.claim_output(out, "job", CKPT)["attempt"]
    second = embeddings.claim_output(out, "job", CKPT)["attempt"]  # e.g. the first driver was presumed dead
    with pytest.raises(embeddings.OutputConflictError, match="claimed by another run"):
        embeddings.commit(out, first)
    assert embeddings.commit(out, second)["state"] == "complete"
    assert embeddings.claim_output(out, "job", CKPT)["attempt"] == second  # finished: written once
