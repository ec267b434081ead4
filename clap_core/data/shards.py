"""The output folder of `clap preprocess`: its layout, its Parquet shards and its index (manifest.json).
This module is the one writer and reader of all three; pretraining, evaluation and embedding read here.

Layout of an output folder (local or s3://):

    OUT/manifest.json                  the index, written last: shards, counts, hours, rejects, config + hash
    OUT/<split>/part-<key>.parquet     one shard per split and input block (train, valid, test, ...)
    OUT/_rejects/part-<split>-<n>.parquet   rows that could not be used, with the stage and reason
    OUT/_done/<unit>.json              per work unit: the files it committed (clap_core.data.markers)
    OUT/_plan/<plan id>/               the job's staged plan (clap_core.preprocess.staging)

Every row of a shard follows `SHARD_SCHEMA`; `audio` holds FLAC bytes at 48 kHz, mono by default.
`<key>` is `<n>-<k>` (unit n of the split rolls over to k+1 at the configured shard size). Ids: an input
clip keeps its id; segments of a long clip are "<id>#seg<i>", augmented copies "<id>#aug<k>" (or
"<id>#seg<i>#aug<k>"); `augment` records the segment and every applied effect with its parameters.

Readers take the shard list from the index, never a folder listing, so files of an interrupted run
that were not committed can never be read:

    for row in iter_shard_rows("s3://bucket/shards", split="train"): ...
    table = read_shards("out/", "valid", columns=["id", "audio", "caption"])
    rejects = committed_rejects("out/")          # the reject rows, from the files the index lists
    index = read_index("out/")                   # manifest.json as a dict

Writers (the preprocess workers and driver):

    files = unit_files(out_uri, split, n)        # where unit n of a split writes
    writer = ShardWriter(files.shard_prefix, out_uri, shard_bytes=256e6, row_group_rows=64)
    write_index(out_uri, build_index(markers, ...))   # once every unit has its marker
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from clap_core import storage
from clap_core.data.markers import Marker, ShardEntry, marker_uri
from clap_core.data.rejects import REJECTS_DIR, read_rejects  # OUT/_rejects/: one file per unit with rejects
from clap_core.io_faults import retry_transient

INDEX_FILE = "manifest.json"  # OUT/manifest.json: the index (its name predates "index"; it stays)
INDEX_FORMAT = "clap-shards/1"  # the index's "format" field
AUGMENTED_SUFFIX = re.compile(r"#aug\d+$")  # what an augmented copy's id adds to its source row's id

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


# -------------------------------------------------------------------------------------------------
# layout


def unit_key(split: str, index: int) -> str:
    """The name of unit `index` of a split: "<split>-<index:05d>" (its marker is _done/<key>.json)."""
    return f"{split}-{index:05d}"


@dataclass(frozen=True)
class UnitFiles:
    """Where one unit writes (absolute URIs)."""

    shard_prefix: str  # OUT/<split>/part-<n>-  (+ "<k>.parquet")
    rejects: str  # OUT/_rejects/part-<split>-<n>.parquet
    marker: str  # OUT/_done/<split>-<n>.json


def unit_files(out_uri: str, split: str, index: int) -> UnitFiles:
    return UnitFiles(shard_prefix=storage.join(out_uri, split, f"part-{index:05d}-"),
                     rejects=storage.join(out_uri, REJECTS_DIR, f"part-{split}-{index:05d}.parquet"),
                     marker=marker_uri(out_uri, unit_key(split, index)))


def relative(out_uri: str, uri: str) -> str:
    """A file's path inside the output folder, as markers and the index record it."""
    return uri[len(out_uri.rstrip("/")) + 1:]


def clean_uncommitted(out_uri: str, splits: list[str], markers: dict[str, Marker]) -> list[str]:
    """Delete temp files and every shard/reject file of these splits that no marker lists (a crash between
    a file and its unit's marker); returns what went. Files outside the layout are never touched."""
    keep = {storage.join(out_uri, p) for m in markers.values() for p in m.committed_files()}
    removed = storage.clean_temp_files(out_uri)
    for folder in sorted(set(splits) | {REJECTS_DIR}):
        for uri in storage.list_files(storage.join(out_uri, folder)):
            if uri.endswith(".parquet") and uri not in keep:
                storage.delete(uri)
                removed.append(uri)
    return removed


# -------------------------------------------------------------------------------------------------
# writing shards


def table_bytes(rows: list[dict], schema: pa.Schema, row_group_rows: int, compression: str = "zstd") -> bytes:
    """A Parquet file of rows, in memory (committed with one atomic put)."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, row_group_size=row_group_rows,
                   compression=compression)
    return buf.getvalue()


class ShardWriter:
    """Buffers a unit's rows and commits a shard file each time their audio reaches shard_bytes."""

    def __init__(self, prefix: str, out_uri: str, shard_bytes: float, row_group_rows: int):
        self.prefix, self.out_uri = prefix, out_uri
        self.shard_bytes, self.row_group_rows = shard_bytes, row_group_rows
        self.rows: list[dict] = []
        self.audio_bytes = 0
        self.shards: list[ShardEntry] = []  # committed files, in write order

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows.append(row)
            self.audio_bytes += len(row["audio"])
            if self.audio_bytes >= self.shard_bytes:
                self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        uri = f"{self.prefix}{len(self.shards):03d}.parquet"
        # no Parquet compression: the audio column is FLAC already
        data = table_bytes(self.rows, SHARD_SCHEMA, self.row_group_rows, compression="none")
        storage.put_atomic(uri, data)
        self.shards.append(ShardEntry(path=relative(self.out_uri, uri), split=self.rows[0]["split"],
                                      rows=len(self.rows), bytes=len(data),
                                      seconds=sum(r["duration_s"] for r in self.rows)))
        self.rows, self.audio_bytes = [], 0


# -------------------------------------------------------------------------------------------------
# the index (manifest.json)


def build_index(markers: list[Marker], *, input_uri: str, job_hash: str, rows_in: int, config: dict,
                config_hash: str) -> dict:
    """The index of a finished output from its units' markers (in plan order): shards, per-split counts
    and hours, rejects by reason, the resolved config and the hashes that identify the job."""
    splits: dict[str, dict] = {}
    reasons: dict[str, int] = {}
    segment_reasons: dict[str, int] = {}
    for m in markers:
        for s in m.shards:
            entry = splits.setdefault(s["split"], {"rows": 0, "hours": 0.0, "shards": 0})
            entry["rows"] += s["rows"]
            entry["hours"] += s["seconds"] / 3600
            entry["shards"] += 1
        for reason, count in m.rejects.by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + count
        for reason, count in m.rejects.segments_by_reason.items():
            segment_reasons[reason] = segment_reasons.get(reason, 0) + count
    return {
        "format": INDEX_FORMAT, "input": input_uri, "job_hash": job_hash,
        "rows_in": rows_in, "sources_out": sum(m.sources_out for m in markers),
        "rows_out": sum(m.rows_out for m in markers), "hours_in": sum(m.seconds_in for m in markers) / 3600,
        "hours_out": sum(m.seconds_out for m in markers) / 3600,
        "cpu_hours": sum(m.cpu_seconds for m in markers) / 3600,
        "splits": dict(sorted(splits.items())),
        "shards": [{k: s[k] for k in ("path", "split", "rows", "bytes", "seconds")} for m in markers for s in m.shards],
        "rejects": {"rows": sum(m.rejects.rows for m in markers), "by_reason": dict(sorted(reasons.items())),
                    "segments": sum(segment_reasons.values()), "segments_by_reason": dict(sorted(segment_reasons.items())),
                    "files": [m.rejects.path for m in markers if m.rejects.path]},
        "units": len(markers), "config": config, "config_hash": config_hash,
    }


def index_uri(out_uri: str) -> str:
    return storage.join(out_uri, INDEX_FILE)


def write_index(out_uri: str, index: dict) -> None:
    """Commit the output: manifest.json, written last (atomic), after every unit's marker."""
    storage.put_atomic(index_uri(out_uri), json.dumps(index, indent=1).encode())


def has_index(uri: str) -> bool:
    """Whether a folder is a finished `clap preprocess` output."""
    return storage.exists(index_uri(uri))


def read_index(out_uri: str) -> dict:
    """OUT/manifest.json; FileNotFoundError while the job has not finished."""
    return json.loads(storage.read_bytes(index_uri(out_uri)))


# -------------------------------------------------------------------------------------------------
# reading shards


def shard_uris(out_uri: str, split: str | None = None) -> list[str]:
    """URIs of the committed shards of one split (or all), in index order."""
    shards = read_index(out_uri)["shards"]
    return [storage.join(out_uri, s["path"]) for s in shards if split is None or s["split"] == split]


def is_shard_folder(uri: str, listing: list[storage.FileStat] | None = None) -> bool:
    """A `clap preprocess` output (its index) or any folder with <split>/*.parquet below it (`listing`: the
    folder's, storage.list_file_stats, when the caller holds it)."""
    return has_index(uri) or bool(shard_files(uri, listing=listing))


def shard_files(uri: str, split: str | None = None, listing: list[storage.FileStat] | None = None) -> list[str]:
    """Shards to read: the ones the index lists (never crash debris), else every Parquet file below
    <uri>/<split> (folders written by other tools; of `listing` when given, else listed here), skipping _rejects/,
    _done/ and temp files."""
    if has_index(uri):
        return shard_uris(uri, split)
    root = str(uri).rstrip("/") if storage.is_s3(uri) else storage.resolve_fs(uri)[1]  # as listings name files
    base = storage.join(root, split) if split else root
    if listing is not None:
        files = [stat.uri for stat in listing if stat.uri.startswith(base + "/")]
    elif storage.is_dir(base):
        files = storage.list_files(base)
    else:
        return []
    return [f for f in files if f.endswith(".parquet") and "/_" not in f[len(root):]
            and storage.TEMP_PREFIX not in f[len(root):]]


def count_rows(uri: str, split: str | None = None) -> int:
    """Rows in a split (None: every split): from the index when the folder has one, else from the Parquet footers."""
    if has_index(uri):
        return sum(s["rows"] for s in read_index(uri)["shards"] if split is None or s["split"] == split)
    return sum(file_rows(shard) for shard in shard_files(uri, split))


def file_rows(uri: str) -> int:
    """Rows of one shard file, from its Parquet footer."""
    return _parquet_file(uri).metadata.num_rows


def _parquet_file(uri: str) -> pq.ParquetFile:
    fs, path = storage.resolve_fs(uri)
    return pq.ParquetFile(fs.open_input_file(path))


def source_clip_id(row_id: str) -> str:
    """The id of the clip a row was made from: an augmented copy's id less its "#aug<k>" (a segment of a long
    clip, "<id>#seg<i>", is other audio: a clip of its own)."""
    return AUGMENTED_SUFFIX.sub("", row_id)


def is_augmented_copy(row: dict) -> bool:
    """An augmented copy (its `augment` record has "copy"; older shards: an id ending in #aug<k>), not a source clip."""
    record = json.loads(row.get("augment") or "{}")
    return "copy" in record or AUGMENTED_SUFFIX.search(str(row.get("id", ""))) is not None


def read_parquet_file(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.resolve_fs(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def iter_shard_rows(uri: str, split: str | None = None, columns: list[str] | None = None) -> Iterator[dict]:
    """Rows (dicts) of one shard file, or of every shard of an output folder (optionally one split), streamed
    READ_BATCH_ROWS at a time. A transient storage error (a reset connection, a throttled request) opens the file
    again and goes on after the last row read (io_faults.retry_transient, as Ray Data retries a read task): no
    row lost or repeated; a persistent one (refused credentials) is raised at once."""
    uris = [uri] if uri.endswith(".parquet") else shard_files(uri, split)
    for shard in uris:
        yield from _file_rows(shard, columns)


READ_BATCH_ROWS = 64  # rows a streaming reader decodes at once: one ShardWriter row group of 10-s FLAC, ~40 MB
WHOLE_ROW_GROUP_BYTES = 64 << 20  # a row group up to this size (compressed) is fetched in one coalesced read
READ_BUFFER_BYTES = 8 << 20  # a bigger one (another tool's Parquet may hold a whole file in one) is read page
#                              after page through a buffer of this size: memory follows the batch, not the row group


def _file_rows(uri: str, columns: list[str] | None) -> Iterator[dict]:
    done = 0  # rows of the file read so far: where a re-opened file resumes
    batches: Iterator[pa.RecordBatch] | None = None

    def next_batch() -> pa.RecordBatch | None:
        nonlocal batches
        try:
            if batches is None:
                batches = _batches_from(uri, columns, done)
            return next(batches, None)
        except Exception:
            batches = None  # a retry opens the file again
            raise

    while (batch := retry_transient(next_batch, what=f"{uri} (after row {done})")) is not None:
        done += batch.num_rows
        yield from batch.to_pylist()


def _batches_from(uri: str, columns: list[str] | None, start: int) -> Iterator[pa.RecordBatch]:
    """Record batches of one file from row `start` on, a row group at a time (a ParquetFile asked for all of
    them at once pre-buffers the whole file); the row groups before `start` are not read."""
    whole = _parquet_file(uri)  # pre-buffered: a row group's column chunks in one coalesced read
    paged = None  # the same file read through READ_BUFFER_BYTES, for row groups too big to fetch whole
    skip = start  # rows still to pass over
    for index in range(whole.metadata.num_row_groups):
        group = whole.metadata.row_group(index)
        if skip >= group.num_rows:
            skip -= group.num_rows
            continue
        source = whole
        if sum(group.column(c).total_compressed_size for c in range(group.num_columns)) > WHOLE_ROW_GROUP_BYTES:
            if paged is None:
                fs, path = storage.resolve_fs(uri)
                paged = pq.ParquetFile(fs.open_input_file(path), metadata=whole.metadata,
                                       buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
            source = paged
        for batch in source.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[index], columns=columns,
                                         use_threads=False):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            yield batch.slice(skip)
            skip = 0


def read_shards(out_uri: str, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of a split (or all splits) as one table (small outputs, tests, evaluation)."""
    tables = [read_parquet_file(u, columns) for u in shard_uris(out_uri, split)]
    schema = SHARD_SCHEMA if columns is None else pa.schema([SHARD_SCHEMA.field(c) for c in columns])
    return pa.concat_tables(tables) if tables else schema.empty_table()


def committed_rejects(out_uri: str) -> pa.Table:
    """Every reject row of a finished output: the files its index lists (never a crashed unit's debris)."""
    return read_rejects(out_uri, read_index(out_uri)["rejects"]["files"])
