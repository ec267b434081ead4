"""Small shard folders written directly in the shard schema (no manifest.json, as other tools would write
them), for tests of the readers of shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clap_core.audio.codec import encode_flac
from clap_core.data.shards import SHARD_SCHEMA

SR = 48_000
TONES = {"low tone": 220.0, "high tone": 1760.0, "buzz": 90.0}


def tone(freq: float, seconds: float, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def shard_row(clip_id: str, wave: np.ndarray, caption: str, label: str, split: str, audio: bytes | None = None) -> dict:
    return {"id": clip_id, "audio": audio if audio is not None else encode_flac(wave, SR), "sample_rate": SR,
            "num_samples": len(wave), "num_channels": 1, "duration_s": len(wave) / SR, "caption": caption,
            "captions": [caption, f"{label}, recorded"], "language": "en", "label": label, "split": split,
            "kind": "env", "source_id": clip_id, "source_path": f"/data/{clip_id}.wav", "augment": "{}"}


def write_shards(folder: Path, per_label: int = 2, split: str = "test", corrupt: int = 0) -> list[dict]:
    """`per_label` clips of each tone class (+ `corrupt` rows of undecodable bytes); returns the rows."""
    rows = []
    for label, freq in TONES.items():
        for i in range(per_label):
            rows.append(shard_row(f"{label.replace(' ', '-')}-{i}", tone(freq, 1.0 + 0.5 * i, phase=i),
                                  f"a clip of a {label}", label, split))
    rows += [shard_row(f"corrupt-{i}", np.zeros(10, np.float32), "broken", "buzz", split, audio=b"not flac")
             for i in range(corrupt)]
    (folder / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), folder / split / "part-0.parquet")
    return rows
