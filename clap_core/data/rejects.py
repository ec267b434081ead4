"""The reject record every job writes (preprocess, embed, evaluate, tune-probe, pretrain): its one builder,
its schema, the `_rejects/` Parquet files that hold it, and the one place where a per-file exception becomes one.

    rec = reject({"id": "a", "source_path": "a.wav"}, "decode", "undecodable", "no decoder ...")
    rec = failure_reject(row, exc)              # any exception raised while reading one file -> a record
    write_rejects("out/_rejects", [rec, ...])   # one Parquet file, named by its rows (a retry rewrites it)
    count_reject_rows("run/_rejects")           # rows of every file of a `_rejects/` folder (Parquet footers)
    read_rejects("out/", files)                 # the reject rows of a job output (the files its index lists)

A record is a `Reject` (a dict with REJECT_SCHEMA's five fields, so Arrow and JSON take it as it is): id,
source_path, stage, reason, detail. `failure_reject` turns bad data into a verdict: the project's
AudioDecodeError keeps its reason, a MemoryError on hostile bytes is `out_of_memory`, malformed files that
crash a decoder library are `decode_error`, any other OSError on one file is `io_error`. Storage faults are
never a verdict on data: `failure_reject` applies clap_core.io_faults' rule (transient and persistent faults
are raised again, for the caller's retry or stop), so every job follows it.
"""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from typing import Iterable, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from clap_core import storage
from clap_core.audio.codec import AudioDecodeError
from clap_core.io_faults import is_data_error

REJECT_SCHEMA = pa.schema([
    pa.field("id", pa.string()),  # input row id (may be empty when the input had none)
    pa.field("source_path", pa.string()),
    pa.field("stage", pa.string(), nullable=False),  # read_manifest / read_meld / decode / validate / augment / write
    pa.field("reason", pa.string(), nullable=False),  # machine-readable reason, e.g. "missing_file"
    pa.field("detail", pa.string()),  # human-readable message
])
REJECT_FIELDS = tuple(REJECT_SCHEMA.names)
LENGTH_REASONS = ("too_long",)  # AudioDecodeError reasons that are validation verdicts (length rules)
REJECTS_DIR = "_rejects"  # every job's reject folder, beside its output
REJECTS_ROW_GROUP = 10_000  # rows per Parquet row group of a rejects file
MAX_DETAIL = 2000  # characters of `detail` kept: a decoder's message can quote a whole hostile header


class Reject(TypedDict):
    """One row of REJECT_SCHEMA; built by `reject` only."""
    id: str  # the input row's id
    source_path: str  # the audio path or URI as given in the input (a CSV line, a shard path)
    stage: str  # where the row was given up
    reason: str  # machine-readable, e.g. "undecodable"
    detail: str  # human-readable message, at most MAX_DETAIL characters


def printable(text) -> str:
    """A string safe to store in a reject row: undecodable bytes shown as \\xNN."""
    if text is None:
        return ""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def reject(row: dict, stage: str, reason: str, detail: str = "") -> Reject:
    """The reject record for `row` (anything with id / source_path)."""
    return Reject(id=printable(row.get("id")), source_path=printable(row.get("source_path")), stage=stage,
                  reason=reason, detail=printable(detail)[:MAX_DETAIL])


def failure_reason(exc: BaseException, stage: str = "decode") -> tuple[str, str, str]:
    """(stage, reason, detail) for an exception raised while reading or decoding one file."""
    if isinstance(exc, AudioDecodeError):
        return ("validate" if exc.reason in LENGTH_REASONS else stage), exc.reason, exc.message
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError):
        return stage, "out_of_memory", detail
    if isinstance(exc, RecursionError):
        return stage, "too_deeply_nested", detail
    if isinstance(exc, OSError):
        return stage, "io_error", detail
    return stage, "decode_error", detail


def failure_reject(row: dict, exc: BaseException, stage: str = "decode") -> Reject:
    """The reject record for one file whose reading raised `exc` (see the module docstring). A storage fault
    (clap_core.io_faults: transient or persistent) is no verdict on the data: it is raised again."""
    if not is_data_error(exc):
        raise exc
    return reject(row, *failure_reason(exc, stage))


# -------------------------------------------------------------------------------------------------
# `_rejects/` files


def rejects_table(records: Iterable[Reject]) -> pa.Table:
    return pa.Table.from_pylist(list(records), schema=REJECT_SCHEMA)


def write_rejects(folder: str, records: list[Reject], name: str | None = None, prefix: str = "") -> str:
    """Records as one Parquet file in `folder` (local or s3://), written atomically; returns its URI.

    The default name hashes the rows (id, source_path, stage, reason): a retried task or a later pass over
    the same rows rewrites its own file instead of adding one, so the files count distinct rejects. A job
    that writes one file per run passes a fixed `name` (and may pass no records: the file says "none").
    `prefix` starts the file name (`clap embed`: its attempt id, see clap_core.data.embeddings)."""
    if name is None:
        key = "\n".join(f"{r['id']}\t{r['source_path']}\t{r['stage']}\t{r['reason']}" for r in records)
        name = f"part-{hashlib.sha256(key.encode()).hexdigest()[:16]}.parquet"
    name = prefix + name
    buf = io.BytesIO()
    pq.write_table(rejects_table(records), buf, row_group_size=REJECTS_ROW_GROUP, compression="zstd")
    uri = storage.join(folder, name)
    storage.put_atomic(uri, buf.getvalue())
    return uri


def reject_files(folder: str) -> list[str]:
    """The committed Parquet files of a `_rejects/` folder ([] when it does not exist), never temp files."""
    return committed_reject_files(storage.list_files(folder))


def committed_reject_files(listing: Iterable[str]) -> list[str]:
    """The committed reject files of a listing of a `_rejects/` folder (temp files of writes in flight left out)."""
    return [u for u in listing if u.endswith(".parquet") and storage.TEMP_PREFIX not in u.rsplit("/", 1)[-1]]


def read_reject_files(uris: Iterable[str]) -> pa.Table:
    """The rows of these reject files as one table (REJECT_SCHEMA; empty when there is none)."""
    tables = []
    for uri in uris:
        fs, path = storage.resolve_fs(uri)
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()


def count_reject_rows(folder_or_uris: str | Iterable[str]) -> int:
    """Rows of a `_rejects/` folder's files (or of these files), read from the Parquet footers (0: none)."""
    uris = reject_files(folder_or_uris) if isinstance(folder_or_uris, str) else folder_or_uris
    total = 0
    for uri in uris:
        fs, path = storage.resolve_fs(uri)
        total += pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
    return total


def reject_reasons(uris: Iterable[str]) -> Counter:
    """reason -> rows, over these reject files."""
    reasons: Counter = Counter()
    for uri in uris:
        fs, path = storage.resolve_fs(uri)
        reasons.update(pq.read_table(path, filesystem=fs, columns=["reason"]).column("reason").to_pylist())
    return reasons


def read_rejects(output: str, files: Iterable[str] | None = None) -> pa.Table:
    """The reject rows of a job's output: `files` (paths relative to `output`, as the job's index lists them:
    `clap preprocess` manifest.json and `clap embed` embeddings.json both hold them under rejects.files), or
    without it every committed file of output/_rejects/ (jobs without an index: evaluate, pretrain)."""
    uris = reject_files(storage.join(output, REJECTS_DIR)) if files is None else \
        [storage.join(output, f) for f in files]
    return read_reject_files(uris)
