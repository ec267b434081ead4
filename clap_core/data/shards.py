"""The Parquet shard format written by `clap preprocess` and read by pretraining, evaluation and embedding.

Layout of an output folder (local or s3://):

    OUT/manifest.json                  written last: shards, counts, hours, rejects, resolved config + hash
    OUT/<split>/part-<key>.parquet     one shard per split and input block (train, valid, test, ...)
    OUT/_rejects/part-<key>.parquet    rows that could not be used, with the stage and reason
    OUT/_done/<unit>.json              per work unit: the files it committed (resume bookkeeping)

Every row of a shard follows `SHARD_SCHEMA`; `audio` holds FLAC bytes at 48 kHz, mono by default.
`<key>` is `<unit>-<k>` (a unit rolls over to k+1 at the configured shard size). Ids: an input clip
keeps its id; segments of a long clip are "<id>#seg<i>", augmented copies "<id>#aug<k>" (or
"<id>#seg<i>#aug<k>"); `augment` records the segment and every applied effect with its parameters.

Readers take the shard list from manifest.json, never a folder listing, so files of an interrupted
run that were not committed can never be read:

    for row in iter_shard_rows("s3://bucket/shards", split="train"): ...
    table = read_shards("out/", "valid", columns=["id", "audio", "caption"])
"""
from __future__ import annotations

import json
import re
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from clap_core import storage

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


def read_output_manifest(out_uri: str) -> dict:
    """OUT/manifest.json; FileNotFoundError while the job has not finished."""
    return json.loads(storage.read_bytes(storage.join(out_uri, "manifest.json")))


def shard_uris(out_uri: str, split: str | None = None) -> list[str]:
    """URIs of the committed shards of one split (or all), in manifest order."""
    shards = read_output_manifest(out_uri)["shards"]
    return [storage.join(out_uri, s["path"]) for s in shards if split is None or s["split"] == split]


def is_shard_folder(uri: str) -> bool:
    """A `clap preprocess` output (its manifest.json) or any folder with <split>/*.parquet below it."""
    return storage.exists(storage.join(uri, "manifest.json")) or bool(shard_files(uri))


def shard_files(uri: str, split: str | None = None) -> list[str]:
    """Shards to read: the ones manifest.json lists (never crash debris), else every Parquet file below
    <uri>/<split> (folders written by other tools), skipping _rejects/, _done/ and temp files."""
    if storage.exists(storage.join(uri, "manifest.json")):
        return shard_uris(uri, split)
    base = storage.join(uri, split) if split else uri
    if not storage.is_dir(base):
        return []
    rel = len(str(uri).rstrip("/"))
    return [f for f in storage.list_files(base)
            if f.endswith(".parquet") and "/_" not in f[rel:] and storage.TEMP_PREFIX not in f[rel:]]


def count_rows(uri: str, split: str) -> int:
    """Rows in a split: from manifest.json when the folder has one, else from the Parquet footers."""
    if storage.exists(storage.join(uri, "manifest.json")):
        return sum(s["rows"] for s in read_output_manifest(uri)["shards"] if s["split"] == split)
    total = 0
    for shard in shard_files(uri, split):
        fs, path = storage.resolve_fs(shard)
        total += pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
    return total


def is_augmented_copy(row: dict) -> bool:
    """An augmented copy (its `augment` record has "copy"; older shards: an id ending in #aug<k>), not a source clip."""
    record = json.loads(row.get("augment") or "{}")
    return "copy" in record or re.search(r"#aug\d+$", str(row.get("id", ""))) is not None


def read_parquet_file(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.resolve_fs(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def iter_shard_rows(uri: str, split: str | None = None, columns: list[str] | None = None) -> Iterator[dict]:
    """Rows (dicts) of one shard file, or of every shard of an output folder (optionally one split)."""
    uris = [uri] if uri.endswith(".parquet") else shard_files(uri, split)
    for shard in uris:
        fs, path = storage.resolve_fs(shard)
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=64, columns=columns):
            yield from batch.to_pylist()


def read_shards(out_uri: str, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of a split (or all splits) as one table (small outputs, tests, evaluation)."""
    tables = [read_parquet_file(u, columns) for u in shard_uris(out_uri, split)]
    schema = SHARD_SCHEMA if columns is None else pa.schema([SHARD_SCHEMA.field(c) for c in columns])
    return pa.concat_tables(tables) if tables else schema.empty_table()
