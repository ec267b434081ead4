"""`clap embed` and `clap evaluate` on a JSONL manifest: relative paths, missing and broken files rejected."""
import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from clap_core.data import embeddings
from clap_core.data.rejects import read_rejects, reject
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from pipelines.embed import embed_manifest
from pipelines.evaluate import evaluate
from tests.fixtures.shards import TONES, tone

pytestmark = pytest.mark.integration


def test_manifest_rows_are_embedded_or_rejected(ray_local, tmp_path):
    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "audio").mkdir()
    rows = []
    for i, (label, freq) in enumerate(TONES.items()):
        sf.write(tmp_path / "audio" / f"{i}.wav", tone(freq, 1.0), 16_000)  # 16 kHz: resampled on the way in
        rows.append({"id": f"clip{i}", "audio_path": f"audio/{i}.wav", "caption": f"a {label}", "label": label})
    (tmp_path / "audio" / "broken.wav").write_bytes(b"RIFF....not really")
    rows += [{"id": "gone", "audio_path": "audio/missing.wav", "caption": "x", "label": "buzz"},
             {"id": "broken", "audio_path": "audio/broken.wav", "caption": "y", "label": "buzz"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    upstream = [reject({"id": "csv/line9", "source_path": "m.csv:9"}, "read_meld", "bad_ids", "x")]  # the caller's
    ray_data_lines = []  # what Ray Data logs while planning the job: no deprecated argument of ours
    handler = logging.Handler()
    handler.emit = lambda record: ray_data_lines.append(record.getMessage())
    logging.getLogger("ray.data").addHandler(handler)
    try:
        summary = embed_manifest(str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl"), str(tmp_path / "emb"),
                                 batch_size=2, input_rejects=upstream)
    finally:
        logging.getLogger("ray.data").removeHandler(handler)
    deprecated = [line for line in ray_data_lines if "deprecated" in line]
    assert ray_data_lines and not deprecated, deprecated
    # Decoding ran in tasks of its own, not fused into the embedding actors (whose class name would then read
    # "MapWorker(MapBatches(decode_batch)->MapBatches(EmbedBatch))"). The GCS lists finished actors too.
    from ray._private.state import actors

    embedders = [a["ActorClassName"] for a in actors().values() if "EmbedBatch" in a["ActorClassName"]]
    assert embedders and set(embedders) == {"MapWorker(MapBatches(EmbedBatch))"}, embedders
    assert summary["rows"] == 3 and summary["rejects"] == 3
    assert summary["reject_reasons"] == {"missing_file": 1, "undecodable": 1, "bad_ids": 1}
    assert sorted(embeddings.read_rejects(str(tmp_path / "emb")).column("id").to_pylist()) == [
        "broken", "csv/line9", "gone"]  # listed in embeddings.json with the job's own
    table = [r for f in (tmp_path / "emb" / "data").glob("*.parquet") for r in pq.read_table(f).to_pylist()]
    model = ClapModel.from_pretrained(tmp_path / "ckpt")
    by_id = {r["id"]: r for r in table}
    expected = model.embed_audio(str(tmp_path / "audio" / "1.wav"))[0]
    assert np.allclose(by_id["clip1"]["audio_embedding"], expected, atol=1e-5)
    assert by_id["clip1"]["source_path"] == "audio/1.wav" and by_id["clip1"]["label"] == "high tone"

    metrics = evaluate(str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl"), "zero-shot", str(tmp_path / "eval"))
    assert metrics["num_audio"] == 3 and metrics["num_rejects"] == 2
    assert metrics["rejects_by_reason"] == {"missing_file": 1, "undecodable": 1}
    rejects = read_rejects(str(tmp_path / "eval")).to_pylist()  # the Parquet reject records every job writes
    assert sorted((r["id"], r["reason"]) for r in rejects) == [("broken", "undecodable"), ("gone", "missing_file")]
