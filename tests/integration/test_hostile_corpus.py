"""The hostile corpus (tests/fixtures/hostile.py) through `clap preprocess`, `clap embed`, `clap evaluate` and
`clap pretrain` on the shared local Ray: no job crashes and every input row is accounted for."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clap_core.data.rejects import read_rejects
from clap_core.data.shards import SHARD_SCHEMA, read_shards
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.preprocess.config import load_preprocess_config
from clap_core.train.config import load_pretrain_config
from pipelines.embed import embed_manifest
from pipelines.evaluate import evaluate
from pipelines.preprocess import preprocess
from pipelines.pretrain import DEFAULT_CONFIG, pretrain
from tests.fixtures.hostile import lying_flac, write_hostile_corpus
from tests.fixtures.shards import shard_row, tone

pytestmark = pytest.mark.integration

# What each input row of the hostile corpus becomes in preprocessing (ids of rejects, or "out").
PREPROCESS = {"audio/good": "out", "clip%23seg1": "out", "audio/lying": "too_long", "audio/loud": "out",
              "audio/empty": "empty_file", "audio/garbage": "undecodable", "audio/nan": "nan_or_inf",
              "audio/a_folder": "is_directory", "audio/pipe": "fifo", "audio/loop": "symlink_loop",
              "audio/missing": "missing_file", "with%23aug1": "out"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_hostile_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    ClapModel(get_model_config("tiny")).save_pretrained(path)
    return str(path)


def test_preprocess_accounts_for_every_hostile_row(ray_local, corpus, tmp_path):
    manifest_path, n_rows = corpus
    cfg = load_preprocess_config(None, ["output.expected_clip_seconds=1.0", "augment.copies=1"])
    manifest = preprocess(str(manifest_path), str(tmp_path / "out"), cfg)
    rejects = read_rejects(str(tmp_path / "out"), manifest["rejects"]["files"]).to_pylist()
    assert manifest["rows_in"] == n_rows == manifest["sources_out"] + len(rejects)
    got = sorted((r["id"], r["reason"]) for r in rejects)
    expected = [(k, v) for k, v in PREPROCESS.items() if v != "out"] + [("clip%23seg1", "duplicate_id")]
    assert [x for x in got if x[1] != "bad_manifest_row"] == sorted(expected)
    assert [x[1] for x in got].count("bad_manifest_row") == 3  # deep JSON, a list, broken JSON
    rows = read_shards(str(tmp_path / "out")).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 8  # 4 clips + 1 augmented copy each, no id collides
    assert {r["source_id"] for r in rows} == {k for k, v in PREPROCESS.items() if v == "out"}
    loud = next(r for r in rows if r["id"] == "audio/loud")
    assert json.loads(loud["augment"])["normalized"]["source_peak"] == pytest.approx(2.0, abs=0.01)


def test_embed_and_evaluate_account_for_every_hostile_row(ray_local, corpus, checkpoint, tmp_path):
    manifest_path, n_rows = corpus
    summary = embed_manifest(checkpoint, str(manifest_path), str(tmp_path / "emb"), batch_size=4)
    assert summary["rows"] + summary["rejects"] == n_rows and summary["rows"] == 4
    assert summary["reject_reasons"]["duplicate_id"] == 1 and summary["reject_reasons"]["too_long"] == 1
    metrics = evaluate(checkpoint, str(manifest_path), "retrieval", str(tmp_path / "eval"))
    assert metrics["num_audio"] + metrics["num_rejects"] == n_rows and metrics["num_audio"] == 4
    rejects = read_rejects(str(tmp_path / "eval")).to_pylist()  # OUTPUT/_rejects/, as every job writes them
    assert len(rejects) == metrics["num_rejects"] and all(r["reason"] for r in rejects)
    got = sorted((r["id"], r["reason"]) for r in rejects if r["reason"] != "bad_manifest_row")
    assert got == sorted([(k, v) for k, v in PREPROCESS.items() if v != "out"] + [("clip%23seg1", "duplicate_id")])


def test_pretrain_skips_and_names_bad_rows(ray_local, tmp_path):
    """Undecodable rows (garbage bytes, a lying header) in a shard are skipped and listed with their shard
    (the bound, data.max_bad_row_fraction, is tested in tests/unit/data/test_job_rejects.py)."""
    rows = [shard_row(f"ok-{i}", tone(220.0 * (1 + i % 3), 1.0), f"tone {i % 3}", "t", "train") for i in range(8)]
    rows += [shard_row("garbage", tone(1.0, 0.1), "x", "t", "train", audio=b"not flac at all"),
             shard_row("lying", tone(1.0, 0.1), "y", "t", "train", audio=lying_flac())]
    (tmp_path / "shards" / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), tmp_path / "shards" / "train" / "part-0.parquet")
    base = ["scaling.num_workers=1", "scaling.max_failures=0", "scaling.resources_per_worker={CPU: 1}",
            "data.decode_tasks=1", "data.shuffle_buffer=0", "data.valid_split=null", "data.min_epoch_rows=0",
            "train.batch_size=4", "train.steps=2", "train.log_every=1", "train.eval_every=0",
            "train.checkpoint_every=2"]
    cfg = load_pretrain_config(DEFAULT_CONFIG, base + ["data.max_bad_row_fraction=0.2"])
    result = pretrain(str(tmp_path / "shards"), str(tmp_path / "run"), "tiny", cfg)
    assert result.error is None  # old: LibsndfileError, retried 4 times, naming neither shard nor row
    records = [r for f in (tmp_path / "run" / "_rejects").glob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert sorted((r["id"], r["reason"]) for r in records) == [("garbage", "undecodable"), ("lying", "too_long")]
    assert all(r["source_path"].endswith("train/part-0.parquet") for r in records)
