"""Object storage that fails: the jobs behind the seeded fault proxy (tests/fixtures/s3_fault_proxy.py) in front of moto.

- Random faults (500, 503 SlowDown, resets before or inside a body, delays) on ~8% of requests:
  preprocess, pretrain (a checkpoint and the export), embed and evaluate finish, and their outputs
  equal the fault-free run (shard rows and audio bytes, embeddings within 1e-6, metrics).
- Three 503s in a row on one input clip never reject it: the unit is left uncommitted, retried, and ends
  identical to the fault-free unit.
- Refusals (bucket missing, wrong credentials, permission denied) fail at once naming the URI; a failed
  upload never leaves a visible object.
- Nothing the jobs wrote or printed holds the (recognisable, fake) credentials.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from clap_core import storage
from clap_core.data.inputs import read_inputs
from clap_core.data.rejects import read_rejects
from clap_core.data.shards import read_shards, unit_files
from clap_core.io_faults import StorageAccessError, TransientIOError, retry_transient
from clap_core.preprocess.config import load_preprocess_config
from clap_core.preprocess.plan import plan_units
from clap_core.preprocess.unit import process_unit
from clap_demo.synth import write_corpus
from tests.fixtures.leaks import assert_no_secret, files_under

pytestmark = pytest.mark.integration
FAULT_RATE, SEED = 0.08, 13


def upload_folder(folder: Path, bucket: str, prefix: str) -> str:
    s3 = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture
def few_retries(monkeypatch):
    """Two attempts per request, so a test can outlast the client's retries quickly."""
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    storage.s3_filesystem.cache_clear()
    yield
    storage.s3_filesystem.cache_clear()


def test_three_503s_on_one_clip_leave_the_unit_uncommitted_then_identical(s3_faults, s3_bucket, tmp_path, few_retries):
    corpus = upload_folder(write_corpus(tmp_path / "corpus", 6, seed=5, seconds=(0.5, 0.8)).parent, s3_bucket, "c")
    cfg = load_preprocess_config(None, ["output.rows_per_unit=8", "augment.copies=1"])
    plan = plan_units(read_inputs(f"{corpus}/manifest.jsonl"), cfg)
    unit = max(plan.units, key=lambda u: len(u.rows))
    victim = unit.rows[0]["audio_uri"].rsplit("/", 1)[-1]
    reference = process_unit(unit, cfg, str(tmp_path / "clean"))

    s3_faults.configure(fail_first={victim: 3})  # more 503s in a row than the client's 2 attempts
    out = str(tmp_path / "faulty")
    with pytest.raises(TransientIOError, match=victim):
        process_unit(unit, cfg, out)
    assert not storage.exists(unit_files(out, unit.split, unit.index).marker)  # nothing committed, no verdict on the clip
    assert not storage.exists(unit_files(out, unit.split, unit.index).rejects)

    marker = retry_transient(lambda: process_unit(unit, cfg, out), what=unit.key, sleep=lambda s: None)
    assert s3_faults.stats["fail_first"] == 3
    assert marker.rejects.rows == 0 and marker.sources_out == len(unit.rows)
    assert replace(marker, cpu_seconds=0.0) == replace(reference, cpu_seconds=0.0)
    for shard in marker.shards:
        assert Path(out, shard["path"]).read_bytes() == Path(tmp_path, "clean", shard["path"]).read_bytes()


def test_three_503s_on_one_clip_never_reject_it_in_embed(s3_faults, s3_bucket, tmp_path, few_retries):
    from pipelines.embed import decode_batch
    from pipelines.embed_input import manifest_item

    corpus = upload_folder(write_corpus(tmp_path / "corpus", 4, seed=6, seconds=(0.5, 0.7)).parent, s3_bucket, "c")
    items = [manifest_item(r) for r in read_inputs(f"{corpus}/manifest.jsonl")]
    batch = {k: np.array([item[k] for item in items], dtype=object) for k in items[0]}
    reference = decode_batch(dict(batch), str(tmp_path / "clean"), attempt="a1")

    s3_faults.configure(fail_first={items[1]["audio_uri"].rsplit("/", 1)[-1]: 3})  # outlasts the 2 attempts
    out = decode_batch(dict(batch), str(tmp_path / "faulty"), attempt="a1")
    assert s3_faults.stats["fail_first"] == 3
    assert list(out["id"]) == list(reference["id"]) == [item["id"] for item in items]
    assert all(np.array_equal(a, b) for a, b in zip(out["wave"], reference["wave"]))
    assert not (tmp_path / "faulty" / "_rejects").exists()


def test_refusals_fail_fast_naming_the_uri(s3_faults, s3_bucket, tmp_path, few_retries, capsys):
    from pipelines.preprocess import preprocess

    manifest = write_corpus(tmp_path / "corpus", 2, seed=1, seconds=(0.5, 0.6))
    cfg = load_preprocess_config(None, [])
    cases = {
        "missing bucket": ({}, "s3://clap-no-such-bucket/out", "does not exist"),
        "wrong credentials": ({"credentials": "AKIASOMEOTHERKEY0000"}, f"s3://{s3_bucket}/out", "access refused"),
        "permission denied": ({"prefix": f"{s3_bucket}/locked"}, f"s3://{s3_bucket}/locked/out", "access refused"),
    }
    for name, (deny, out, message) in cases.items():
        s3_faults.configure(deny=deny)
        start = time.monotonic()
        with pytest.raises(StorageAccessError) as err:
            preprocess(str(manifest), out, cfg)
        assert out in str(err.value) and message in str(err.value), name
        assert time.monotonic() - start < 30, f"{name}: took {time.monotonic() - start:.1f} s"

    # the command line says it in one line, without a traceback
    s3_faults.configure()
    from pipelines.cli import main

    assert main(["preprocess", "--input", str(manifest), "--output", "s3://clap-no-such-bucket/out"]) == 3
    err = capsys.readouterr().err
    assert "clap preprocess: s3://clap-no-such-bucket/out" in err and "Traceback" not in err

    # a write refused or failing midway never becomes visible to readers
    big = os.urandom(12_000_000)  # two parts of a multipart upload
    for plan, error in (({"fail_first": {"partNumber=2": 50}}, TransientIOError),
                        ({"deny": {"prefix": f"{s3_bucket}/locked"}}, StorageAccessError)):
        s3_faults.configure(**plan)
        uri = f"s3://{s3_bucket}/locked/big.bin"
        with pytest.raises(error, match=uri):
            storage.put_atomic(uri, big)
        s3_faults.configure()
        assert not storage.exists(uri) and storage.list_files(f"s3://{s3_bucket}/locked") == []


def rows_by_id(uri: str) -> dict[str, dict]:
    rows = read_shards(uri).to_pylist()
    assert len(rows) == len({r["id"] for r in rows})
    return {r["id"]: r for r in rows}


def embeddings_by_id(uri: str) -> dict[str, np.ndarray]:
    files = [f for f in storage.list_files(uri) if f.endswith(".parquet") and "/_rejects/" not in f]
    out = {}
    for f in files:
        table = pq.read_table(storage.resolve_fs(f)[1], filesystem=storage.resolve_fs(f)[0])
        for row_id, emb in zip(table.column("id").to_pylist(), table.column("audio_embedding").to_pylist()):
            assert row_id not in out, f"{row_id} embedded twice"
            out[row_id] = np.asarray(emb)
    return out


def test_pipeline_under_random_faults_equals_fault_free_run(ray_local, s3_faults, s3_bucket, tmp_path, capfd):
    from clap_core.model.clap import ClapModel
    from clap_core.storage import local_copy
    from clap_core.train.config import load_pretrain_config
    from pipelines.embed import embed_dataset
    from pipelines.evaluate import evaluate
    from pipelines.preprocess import preprocess
    from pipelines.pretrain import DEFAULT_CONFIG, pretrain

    corpus = upload_folder(write_corpus(tmp_path / "corpus", 24, seed=7, seconds=(0.5, 0.9)).parent, s3_bucket, "c")
    cfg = load_preprocess_config(None, ["ray.concurrency=2", "output.rows_per_unit=4", "augment.copies=1",
                                        "augment.splits=[train, valid, test]"])  # one copy of every clip
    root = f"s3://{s3_bucket}"
    report = {}

    def faulty(phase: str, fn):
        s3_faults.configure(rate=FAULT_RATE, seed=SEED + len(report))
        start = time.monotonic()
        try:
            return fn()
        finally:
            report[phase] = {**s3_faults.stats, "seconds": round(time.monotonic() - start)}
            s3_faults.configure()

    clean = preprocess(f"{corpus}/manifest.jsonl", f"{root}/clean", cfg)
    noisy = faulty("preprocess", lambda: preprocess(f"{corpus}/manifest.jsonl", f"{root}/faulty", cfg))
    a, b = rows_by_id(f"{root}/clean"), rows_by_id(f"{root}/faulty")
    assert sorted(a) == sorted(b) and len(a) == 2 * clean["sources_out"] > 0
    assert all(a[i] == b[i] for i in a)  # every column, audio bytes included
    assert noisy["shards"] == clean["shards"] and noisy["rejects"] == clean["rejects"]
    assert read_rejects(f"{root}/faulty").num_rows == clean["rejects"]["rows"]

    train_cfg = load_pretrain_config(DEFAULT_CONFIG, [
        "scaling.num_workers=1", "scaling.max_failures=0", "scaling.resources_per_worker={CPU: 1}",
        "data.decode_tasks=1", "data.shuffle_buffer=16", "data.min_epoch_rows=64", "data.valid_split=null",
        "train.steps=3", "train.batch_size=4", "train.checkpoint_every=2", "train.eval_every=0",
        "train.log_every=1", "train.warmup_steps=1"])
    run = f"{root}/run"
    result = faulty("pretrain", lambda: pretrain(f"{root}/faulty", run, "tiny", train_cfg))
    assert result.error is None
    metrics = json.loads(storage.read_bytes(f"{run}/metrics.json"))
    assert metrics["step"] == 3 and [h["step"] for h in metrics["history"]] == [1, 2, 3]
    assert storage.exists(f"{run}/checkpoint_00000002/deepspeed/mp_rank_00_model_states.pt")
    checkpoint = f"{run}/final"
    ClapModel.from_pretrained(local_copy(checkpoint))  # the export loads

    embed_dataset(checkpoint, f"{root}/clean", f"{root}/emb-clean", concurrency=1)
    faulty("embed", lambda: embed_dataset(checkpoint, f"{root}/clean", f"{root}/emb-faulty", concurrency=1))
    e_clean, e_faulty = embeddings_by_id(f"{root}/emb-clean"), embeddings_by_id(f"{root}/emb-faulty")
    assert sorted(e_clean) == sorted(e_faulty) == sorted(a)
    assert max(float(np.abs(e_clean[i] - e_faulty[i]).max()) for i in e_clean) <= 1e-6

    m_clean = evaluate(checkpoint, f"{root}/clean", "retrieval", str(tmp_path / "eval-clean"))
    m_faulty = faulty("evaluate", lambda: evaluate(checkpoint, f"{root}/clean", "retrieval",
                                                    str(tmp_path / "eval-faulty")))
    assert m_clean == m_faulty and m_clean["num_rejects"] == 0

    survived = {phase: sum(v for k, v in s.items() if k in ("500", "503", "reset_before", "reset_mid", "delay"))
                for phase, s in report.items()}
    assert all(n > 0 for n in survived.values()), report

    # No credential in anything the jobs wrote (every object of the bucket, local reports) or printed.
    secrets = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]]
    written = {uri: storage.read_bytes(uri) for uri in storage.list_files(root)}
    written.update(files_under(tmp_path, skip="corpus"))
    assert any("tfevents" in k for k in written) and any(k.endswith(".pt") for k in written)
    ray_logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"  # every worker's output
    written.update(files_under(ray_logs))
    printed = capfd.readouterr()
    assert_no_secret(secrets, written, [printed.out, printed.err])
    with capfd.disabled():
        print(f"\nS3 faults at {FAULT_RATE:.0%} (seed {SEED}), all survived, rows lost 0: " + "; ".join(
            f"{phase} {survived[phase]} of {s['requests']} requests "
            f"({', '.join(f'{k} {v}' for k, v in sorted(s.items()) if k not in ('requests', 'seconds'))}, {s['seconds']} s)"
            for phase, s in report.items()))
        print(f"leak check: {len(written)} files written + everything printed: no credential found")
