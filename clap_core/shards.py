"""The Parquet shard format written by `clap preprocess` and read by pretraining, evaluation and embedding.

Layout of an output folder (local or s3://):

    OUT/manifest.json                  written last: shards, counts, hours, rejects, resolved config + hash
    OUT/<split>/part-<key>.parquet     one shard per split and input block (train, valid, test, ...)
    OUT/_rejects/part-<key>.parquet    rows that could not be used, with the stage and reason

Every row of a shard follows `SHARD_SCHEMA`; `audio` holds FLAC bytes at 48 kHz, mono by default.
"""
from __future__ import annotations

import pyarrow as pa

SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),  # unique row id; augmented copies get "<id>#aug<k>"
    pa.field("audio", pa.binary(), nullable=False),  # FLAC bytes
    pa.field("sample_rate", pa.int32(), nullable=False),  # always 48000
    pa.field("num_samples", pa.int64(), nullable=False),  # samples per channel
    pa.field("num_channels", pa.int16(), nullable=False),  # 1 unless mono downmix is off
    pa.field("duration_s", pa.float64(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),  # main caption
    pa.field("captions", pa.list_(pa.string()), nullable=False),  # all captions, main first (AudioCaps/Clotho: 5)
    pa.field("language", pa.string()),  # BCP-47 code, e.g. "en"
    pa.field("label", pa.string()),  # class label when the corpus has one (zero-shot, probes)
    pa.field("split", pa.string(), nullable=False),  # train / valid / test / ...
    pa.field("kind", pa.string()),  # "speech" or "env" (used by the environmental mix)
    pa.field("source_id", pa.string(), nullable=False),  # id of the input row this came from
    pa.field("source_path", pa.string(), nullable=False),  # audio path or URI as given in the input
    pa.field("augment", pa.string(), nullable=False),  # JSON: {} for originals, else effects and parameters
])

REJECT_SCHEMA = pa.schema([
    pa.field("id", pa.string()),  # input row id (may be empty when the input had none)
    pa.field("source_path", pa.string()),
    pa.field("stage", pa.string(), nullable=False),  # read_manifest / decode / validate / augment / write
    pa.field("reason", pa.string(), nullable=False),  # machine-readable reason, e.g. "missing_file"
    pa.field("detail", pa.string()),  # human-readable message
])
