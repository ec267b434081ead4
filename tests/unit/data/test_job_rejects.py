"""`clap embed` / `clap evaluate` per-file handling without Ray: any exception on one file is one reject
record (the preprocessing schema), duplicate ids are reported, and the hostile corpus is fully accounted."""
from __future__ import annotations

import errno

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clap_core.data import rejects as rejects_module
from clap_core.data.inputs import read_inputs
from clap_core.data.rejects import (
    REJECT_SCHEMA,
    count_reject_rows,
    failure_reason,
    reject,
    reject_reasons,
    write_rejects,
)
from clap_core.eval import sources
from pipelines import embed, embed_input
from tests.fixtures.hostile import write_hostile_corpus


def read_rejects(output) -> list[dict]:
    return [r for f in sorted((output / "_rejects").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.mark.parametrize("exc,reason", [(MemoryError("Unable to allocate 256. GiB"), "out_of_memory"),
                                        (OSError(errno.EINVAL, "Invalid argument"), "io_error"),
                                        (RuntimeError("Error opening <_io.BytesIO>"), "decode_error"),
                                        (RecursionError("maximum recursion depth"), "too_deeply_nested")])
def test_any_exception_on_one_file_is_one_reject_in_embed(tmp_path, monkeypatch, exc, reason):
    def decode_row(row):
        if row["id"] == "bad":
            raise exc
        return np.zeros(480, np.float32)

    monkeypatch.setattr(embed, "decode_row", decode_row)
    batch = {"id": np.array(["ok", "bad", "ok2"]), "source_path": np.array(["a.wav", "b.wav", "c.wav"]),
             "error_reason": np.array(["", "", ""]), "error_detail": np.array(["", "", ""])}
    out = embed.decode_batch(batch, str(tmp_path), attempt="a1")  # old: only AudioDecodeError was caught, the job died
    assert list(out["id"]) == ["ok", "ok2"] and len(out["wave"]) == 2
    records = read_rejects(tmp_path)
    assert [(r["id"], r["source_path"], r["stage"], r["reason"]) for r in records] == [("bad", "b.wav", "decode", reason)]
    table = pq.read_table(next((tmp_path / "_rejects").glob("*.parquet")))
    assert table.schema.equals(REJECT_SCHEMA)


def test_any_exception_on_one_file_is_one_reject_in_evaluate(tmp_path, monkeypatch):
    corpus, _ = write_hostile_corpus(tmp_path / "c")

    def convert(row, max_seconds):
        if row["source_path"].endswith("good2.flac"):
            raise OSError(errno.EINVAL, "Invalid argument")  # EIO would be transient: retried (io_faults)
        return real(row, max_seconds)

    real = sources.manifest_row_to_item
    monkeypatch.setattr(sources, "manifest_row_to_item", convert)
    pairs = list(sources.iter_eval_items(str(corpus)))
    rejected = [(r["id"], r["stage"], r["reason"]) for _, r in pairs if r is not None]
    assert ("clip%23seg1", "decode", "io_error") in rejected  # old: the OSError ended the evaluation
    assert sum(item is not None for item, _ in pairs) == 3


def test_reject_files_round_trip_and_a_retry_rewrites_its_own_file(tmp_path):
    """write_rejects -> read/count/reasons; the same rows again rewrite one file; a fixed name is replaced."""
    folder = str(tmp_path / "_rejects")
    records = [reject({"id": "a\udcff", "source_path": "x.wav"}, "decode", "undecodable", "y" * 5000),
               reject({"id": "b"}, "read_manifest", "duplicate_id")]
    assert records[0]["id"] == "a\\xff" and len(records[0]["detail"]) == rejects_module.MAX_DETAIL
    assert records[1]["source_path"] == "" and list(records[1]) == list(REJECT_SCHEMA.names)
    first = write_rejects(folder, records)
    assert write_rejects(folder, list(records)) == first  # a retried task: same rows, same file
    write_rejects(folder, records[:1])  # other rows: another file
    (tmp_path / "_rejects" / "not-a-reject.txt").write_text("x")
    assert count_reject_rows(folder) == 3 and count_reject_rows(str(tmp_path / "nothing")) == 0
    assert reject_reasons(rejects_module.reject_files(folder)) == {"undecodable": 2, "duplicate_id": 1}
    table = rejects_module.read_rejects(str(tmp_path))  # no index: every committed file of OUTPUT/_rejects/
    assert table.schema.equals(REJECT_SCHEMA) and sorted(table.column("id").to_pylist()) == ["a\\xff", "a\\xff", "b"]
    listed = rejects_module.read_rejects(str(tmp_path), [first[len(str(tmp_path)) + 1:]])  # what an index lists
    assert listed.to_pylist() == records
    write_rejects(folder, records, name="evaluate.parquet")
    write_rejects(folder, [], name="evaluate.parquet")  # a run without rejects replaces the earlier run's file
    assert count_reject_rows(folder) == 3
    assert rejects_module.read_rejects(str(tmp_path / "empty")).num_rows == 0


def test_failure_reason_keeps_the_decoders_reason():
    from clap_core.audio.codec import AudioDecodeError

    assert failure_reason(AudioDecodeError("undecodable", "x")) == ("decode", "undecodable", "x")
    assert failure_reason(AudioDecodeError("too_long", "y"))[:2] == ("validate", "too_long")


# The hostile corpus: what each row must become in every job (preprocess adds its own caption checks).
EXPECTED_EVAL = {"audio/good": "ok", "clip%23seg1": "ok", "audio/lying": "too_long", "audio/loud": "ok",
                 "audio/empty": "empty_file", "audio/garbage": "undecodable", "audio/nan": "nan_or_inf",
                 "audio/a_folder": "is_directory", "audio/pipe": "fifo", "audio/loop": "symlink_loop",
                 "audio/missing": "missing_file", "with%23aug1": "ok"}


def test_hostile_corpus_through_evaluate_is_fully_accounted(tmp_path):
    corpus, n_rows = write_hostile_corpus(tmp_path / "c")
    pairs = list(sources.iter_eval_items(str(corpus), max_seconds=600.0))
    assert len(pairs) == n_rows  # every input row: an item or a reject
    got = [(item.id, "ok") if item else (r["id"], r["reason"]) for item, r in pairs]
    assert sorted(r for _, r in got).count("bad_manifest_row") == 3  # deep JSON, a list, broken JSON
    assert ("clip%23seg1", "duplicate_id") in got  # the second row with that id: reported, evaluated once
    assert {k: v for k, v in got if v not in ("bad_manifest_row", "duplicate_id")} == EXPECTED_EVAL


def test_embed_duplicate_ids_are_reported_not_embedded_twice(tmp_path):
    corpus, n_rows = write_hostile_corpus(tmp_path / "c")
    items = [embed_input.manifest_item(r) for r in read_inputs(corpus)]
    unique, duplicates = embed_input.unique_items(items)
    assert len(unique) + len(duplicates) == n_rows
    assert [(d["id"], d["reason"]) for d in duplicates] == [("clip%23seg1", "duplicate_id")]
    assert len({i["id"] for i in unique}) == len(unique)
    decoded = embed.decode_batch({k: np.array([i[k] for i in unique], dtype=object) for k in unique[0]},
                                 str(tmp_path / "out"), attempt="a1")
    rejects = read_rejects(tmp_path / "out")
    assert len(decoded["id"]) + len(rejects) == len(unique)  # no crash, every row accounted for
    assert sorted(decoded["id"]) == ["audio/good", "audio/loud", "clip%23seg1", "with%23aug1"]
    assert pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA).num_rows == len(rejects)


# -----------------------------------------------------------------------------
# pretraining: bad shard rows are skipped, named and bounded


def test_training_batches_skip_and_name_bad_rows(tmp_path):
    from clap_core.train.batching import PairBatchTransform
    from tests.fixtures.hostile import lying_flac
    from tests.fixtures.shards import shard_row, tone

    rows = [shard_row(f"ok-{i}", tone(440.0, 1.0), f"tone {i}", "t", "train") for i in range(3)]
    rows.insert(1, shard_row("garbage", tone(1.0, 0.1), "x", "t", "train", audio=b"not flac at all"))
    rows.append(shard_row("lying", tone(1.0, 0.1), "y", "t", "train", audio=lying_flac()))
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("id", "audio", "caption", "captions")}
    batch["path"] = np.array(["bucket/shards/train/part-0.parquet"] * len(rows), dtype=object)
    transform = PairBatchTransform(48_000, "bytes", 16, training=False, rejects_uri=str(tmp_path / "_rejects"))
    with pytest.warns(UserWarning, match="shard bucket/shards/train/part-0.parquet id garbage"):
        out = transform(batch)  # old: LibsndfileError for the whole batch, retried by Ray Data
    assert out["waves"].shape == (3, 48_000) and out["input_ids"].shape[0] == 3
    records = read_rejects(tmp_path)
    assert sorted((r["id"], r["reason"]) for r in records) == [("garbage", "undecodable"), ("lying", "too_long")]
    assert {r["source_path"] for r in records} == {"bucket/shards/train/part-0.parquet"}
    transform(batch)  # read again in a later pass: the same file is rewritten, bad rows are counted once
    assert count_reject_rows(str(tmp_path / "_rejects")) == 2
    for bad in (1, 4):  # a later pass batches the two bad rows apart: still one record each
        with pytest.warns(UserWarning):
            transform({k: v[[0, bad]] for k, v in batch.items()})
    assert count_reject_rows(str(tmp_path / "_rejects")) == 2


def test_bad_row_bound_fails_the_run_with_a_pointer(tmp_path):
    from clap_core.train.config import load_pretrain_config
    from clap_core.train.worker import BadRowsError, check_bad_rows
    from pipelines.pretrain import DEFAULT_CONFIG

    cfg = load_pretrain_config(DEFAULT_CONFIG, ["data.max_bad_row_fraction=0.001"])
    check_bad_rows(cfg, str(tmp_path), 5000)  # no rejects yet
    write_rejects(str(tmp_path / "_rejects"), [{"id": f"r{i}", "source_path": "s", "stage": "decode",
                                                    "reason": "undecodable", "detail": ""} for i in range(5)])
    check_bad_rows(cfg, str(tmp_path), 5000)  # 5 of 5000 = 0.1%: allowed
    with pytest.raises(BadRowsError, match=r"5 of 4000 training rows do not decode .*_rejects"):
        check_bad_rows(cfg, str(tmp_path), 4000)
