"""The output format of `clap embed`: written and read by this module only.

    OUTPUT/embeddings.json       the index: job hash, checkpoint identity, state, attempt ids, the data files
                                 and row counts
    OUTPUT/data/<attempt>_*.parquet      id, audio_embedding (D,), text_embedding (D,) (unless --no-text),
                                 duration_s and the input's metadata (caption, label, split, source_path, ...)
    OUTPUT/_rejects/<attempt>_*.parquet  rows that could not be embedded (clap_core.data.rejects)

    table = read_table("emb/")                       # every embedded row, sorted by id
    audio = embedding_matrix(table, "audio_embedding")  # (N, D) float32
    layers = layer_matrix(table)                     # (N, L, H) float32 pooled speech-tower layers, or None
    rejects = read_rejects("emb/")                   # the rows that could not be embedded

Readers (`clap search`, the probe, the job summaries) read through this module only: the files the index
lists (never a folder listing, so no stray file is read), and only once the job has committed it (state
"complete").

Attempts. Every run of the job (a driver process) draws a random attempt id when it claims OUTPUT: it writes
the index in state "running" with that id before it writes anything else, and every file it writes is named
`<attempt>_...`. A killed driver's write tasks can still land files after a re-run has claimed OUTPUT; those
carry the old attempt's id, so the re-run's commit, which lists only files named with its own id, never
counts them, and the committed index lists exactly the files of the run that finished.

Deletion rule: a run deletes only files under data/ and _rejects/ whose name starts with an attempt id that
the index records for this same job (its own earlier, unfinished attempts), when it claims OUTPUT and again
when it commits; a stale file landing after the commit is never read and goes with `remove_output`. Nothing
else is ever deleted: a folder holding anything but a `clap embed` output is refused, never cleared, and a
file under data/ named otherwise stays where it is, unread.
"""
from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clap_core import storage
from clap_core.data import rejects
from clap_core.data.rejects import REJECTS_DIR
from clap_core.data.shards import index_uri

INDEX_FILE = "embeddings.json"
DATA_DIR = "data"
FORMAT = "clap-embeddings/1"


class OutputConflictError(ValueError):
    """OUTPUT holds something this job did not write (another job's output, a corpus, other files)."""


class CheckpointMismatchError(ValueError):
    """An index is used with another checkpoint than the one that embedded it."""


def checkpoint_identity(folder: str | Path) -> str:
    """sha256 of every file of a local checkpoint folder (weights, config, tokenizer), by relative path."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        for block in storage.iter_blocks(str(path)):
            digest.update(block)
    return digest.hexdigest()[:32]


def input_identity(input_uri: str) -> str:
    """What the input holds: a shard folder's manifest.json or a manifest file's bytes (else names and sizes)."""
    digest = hashlib.sha256()
    shard_index = index_uri(input_uri)  # a `clap preprocess` output: its index identifies its rows
    if storage.exists(shard_index):
        digest.update(storage.read_bytes(shard_index))
    elif storage.is_dir(input_uri):
        for uri in storage.list_files(input_uri):
            digest.update(f"{uri[len(input_uri):]}:{storage.file_size(uri)}\n".encode())
    else:  # a manifest of any size: hashed a block at a time, never held (the driver keeps to bounded memory)
        for block in storage.iter_blocks(input_uri):
            digest.update(block)
    return digest.hexdigest()[:32]


def job_hash(checkpoint_id: str, input_uri: str, split: str | None, text: bool, precision: str = "auto",
             layers: bool = False) -> str:
    """Equal for two runs that must write the same rows (batch size and actor count change nothing)."""
    key = {"format": FORMAT, "checkpoint": checkpoint_id, "input": input_identity(input_uri), "split": split,
           "text": text, "precision": precision, "layers": layers}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_index(output: str) -> dict | None:
    uri = storage.join(output, INDEX_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def claim_output(output: str, job: str, checkpoint: dict) -> dict:
    """Make OUTPUT this job's. Returns the committed index when this job already finished there (nothing to
    do: state "complete"), else the new "running" index whose `attempt` names every file this run writes,
    after removing the files of this job's earlier, unfinished attempts. Refuses anything else."""
    manifest = read_index(output)
    files = storage.list_files(output)
    if manifest is None and files:
        raise OutputConflictError(f"{output} is not empty and is not a `clap embed` output ({len(files)} files, "
                                  f"e.g. {files[0]}); nothing was deleted: choose an empty or new --output")
    if manifest is not None and manifest.get("job_hash") != job:
        raise OutputConflictError(f"{output} holds the output of another embedding job (job hash "
                                  f"{manifest.get('job_hash')} != {job}: another checkpoint, input, split or "
                                  f"--no-text); nothing was deleted: choose a new --output")
    if manifest is not None and manifest.get("state") == "complete":
        return manifest
    earlier = list(manifest.get("attempts", [])) if manifest else []
    for uri in attempt_files(output, earlier):  # an unfinished run of this job: its own files
        storage.delete(uri)
    attempt = secrets.token_hex(6)  # 48 random bits: unique per driver run
    claimed = {"format": FORMAT, "state": "running", "job_hash": job, "checkpoint": checkpoint,
               "attempt": attempt, "attempts": earlier + [attempt]}
    storage.put_atomic(storage.join(output, INDEX_FILE), json.dumps(claimed, indent=1).encode())
    return claimed


def file_prefix(attempt: str) -> str:
    """What every file name of an attempt starts with (data files and reject files)."""
    return f"{attempt}_"


def attempt_files(output: str, attempts: list[str]) -> list[str]:
    """The files under data/ and _rejects/ written by these attempts (by name), uncommitted temp files included."""
    if not attempts:
        return []
    return _written_by(storage.list_files(data_path(output)) + storage.list_files(rejects_folder(output)), attempts)


def _written_by(listing: list[str], attempts: list[str]) -> list[str]:
    prefixes = tuple(file_prefix(a) for a in attempts)  # none: no name starts with ()
    return [u for u in listing if _named_by(u, prefixes) or _named_by(u, prefixes, temp=True)]


def _named_by(uri: str, prefixes: tuple[str, ...], temp: bool = False) -> bool:
    name = uri.rsplit("/", 1)[-1]
    if temp:  # a local atomic write in flight: TEMP_PREFIX + 12 hex + "-" + the final name
        name = name[len(storage.TEMP_PREFIX) + 13:] if name.startswith(storage.TEMP_PREFIX) else ""
    return name.startswith(prefixes)


def data_path(output: str) -> str:
    return storage.join(output, DATA_DIR)


def rejects_folder(output: str) -> str:
    """OUTPUT/_rejects/: where the job writes its reject files (clap_core.data.rejects.write_rejects)."""
    return storage.join(output, REJECTS_DIR)


def commit(output: str, attempt: str) -> dict:
    """List this attempt's files (row counts from the Parquet footers) in the index, state "complete".
    Refuses when another run has claimed OUTPUT since (its index names another attempt)."""
    manifest = read_index(output)
    if manifest is None:
        raise FileNotFoundError(f"{output} has no {INDEX_FILE}: claim_output was not called")
    if manifest.get("attempt") != attempt or manifest.get("state") != "running":
        raise OutputConflictError(f"{output} was claimed by another run of this job (attempt "
                                  f"{manifest.get('attempt')}, state {manifest.get('state')!r}) after this one "
                                  f"(attempt {attempt}); this run's files are left to it")
    # one listing of each folder (an S3 LIST per 1,000 files) serves both the stale files and this run's own
    data_listing, reject_listing = storage.list_files(data_path(output)), storage.list_files(rejects_folder(output))
    stale = _written_by(data_listing + reject_listing, [a for a in manifest["attempts"] if a != attempt])
    for uri in stale:
        storage.delete(uri)  # stale files of this job's killed attempts that landed since the claim
    rel = len(output.rstrip("/")) + 1
    own = (file_prefix(attempt),)
    data = [{"path": f[rel:], "rows": _num_rows(f)} for f in data_listing
            if f.endswith(".parquet") and _named_by(f, own)]
    reject_files = [f for f in rejects.committed_reject_files(reject_listing) if _named_by(f, own)]
    reasons = rejects.reject_reasons(reject_files)
    manifest.update(state="complete", files=data, rows=sum(d["rows"] for d in data),
                    rejects={"files": [f[rel:] for f in reject_files], "rows": sum(reasons.values()),
                             "reasons": dict(reasons)})
    storage.put_atomic(storage.join(output, INDEX_FILE), json.dumps(manifest, indent=1).encode())
    return manifest


def write_data_file(output: str, attempt: str, name: str, batches: list[dict[str, np.ndarray]]) -> str:
    """Embedded rows as one Parquet file OUTPUT/data/<attempt>_<name>.parquet, written atomically; returns its
    URI. The in-process runner's writer (pipelines.embed_local); a Ray job writes the same columns with Ray
    Data's write_parquet. `batches`: the embedding stage's outputs, dicts of equal-length numpy columns: 1-D
    (ids, metadata, durations) or 2-D (B, D) embeddings, stored as fixed-size lists of float32."""
    columns: dict[str, list[pa.Array]] = {}
    for batch in batches:
        for key, values in batch.items():
            columns.setdefault(key, []).append(_arrow(values))
    table = pa.table({key: pa.concat_arrays(arrays) for key, arrays in columns.items()})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    uri = storage.join(data_path(output), f"{file_prefix(attempt)}{name}.parquet")
    storage.put_atomic(uri, buf.getvalue().to_pybytes())
    return uri


def _arrow(values: np.ndarray) -> pa.Array:
    if values.ndim == 2:  # (B, D) -> B fixed-size lists of D float32
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    if values.dtype.kind in "OUS":  # numpy strings or Python objects (None, str): Arrow strings
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())
    return pa.array(values)


def remove_output(output: str) -> None:
    """Delete an embedding output that the caller owns: the files of every attempt its index records, the files
    it lists, then the index."""
    manifest = read_index(output)
    if manifest is None:
        return
    listed = [storage.join(output, f["path"]) for f in manifest.get("files", [])]
    listed += [storage.join(output, f) for f in manifest.get("rejects", {}).get("files", [])]
    for uri in dict.fromkeys(attempt_files(output, manifest.get("attempts", [])) + listed):
        if storage.exists(uri):
            storage.delete(uri)
    storage.delete(storage.join(output, INDEX_FILE))


def summary(manifest: dict) -> dict:
    """{'rows', 'rejects', 'reject_reasons'}: the counts a job prints."""
    return {"rows": manifest["rows"], "rejects": manifest["rejects"]["rows"],
            "reject_reasons": manifest["rejects"]["reasons"]}


def _num_rows(uri: str) -> int:
    fs, path = storage.resolve_fs(uri)
    return pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows


def committed_index(output: str) -> dict:
    manifest = read_index(output)
    if manifest is None:
        raise FileNotFoundError(f"{output} holds no {INDEX_FILE}: not a `clap embed` output")
    if manifest.get("state") != "complete":
        raise FileNotFoundError(f"{output}: the embedding job has not finished (state {manifest.get('state')!r})")
    return manifest


def read_table(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every embedded row of a finished output, sorted by id (file order depends on the job's scheduling)."""
    tables = list(iter_tables(output, columns))
    if not tables:
        raise FileNotFoundError(f"{output}: the embedding output holds no rows")
    return pa.concat_tables(tables).sort_by("id")


def iter_tables(output: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows of a finished output one data file at a time, in the index's order (memory: one file). With
    `columns`, only those the file has: a column the output lacks (e.g. text_embedding after --no-text) is left
    out, never an error."""
    for entry in committed_index(output)["files"]:
        fs, path = storage.resolve_fs(storage.join(output, entry["path"]))
        with fs.open_input_file(path) as f:
            file = pq.ParquetFile(f)
            names = None if columns is None else [c for c in columns if c in file.schema_arrow.names]
            yield file.read(columns=names)


def read_rejects(output: str) -> pa.Table:
    """The reject rows of a finished output: the files its manifest lists."""
    return rejects.read_rejects(output, committed_index(output)["rejects"]["files"])


def embedding_matrix(table: pa.Table, column: str) -> np.ndarray:
    """(N, D) float32 from a column of equal-length float lists (fixed-size lists as the in-process runner writes
    them, or Ray Data's tensor extension over lists): the values reshaped, never a Python float per value (a
    million 512-d rows would be half a billion of them)."""
    parts = []
    for chunk in table.column(column).chunks:
        lists = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        bounds = pc.min_max(pc.list_value_length(lists))
        if lists.null_count or (len(lists) and bounds["min"] != bounds["max"]):
            raise ValueError(f"{column}: rows of different lengths or missing values; not an embedding column")
        values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        parts.append(values.reshape(len(lists), values.size // len(lists) if len(lists) else 0))
    filled = [p for p in parts if len(p)]
    return np.concatenate(filled) if filled else np.zeros((0, 0), np.float32)


def layer_matrix(table: pa.Table) -> np.ndarray | None:
    """(N, L, H) float32 pooled speech-tower layers from the flattened (N, L * H) `audio_layers`, or None
    when the output was embedded without layers."""
    if "audio_layers" not in table.column_names:
        return None
    flat = embedding_matrix(table, "audio_layers")  # (N, L * H)
    count = int(table.column("audio_layer_count")[0].as_py()) if table.num_rows else 1
    return flat.reshape(len(flat), count, -1)


def text_column(table: pa.Table, column: str) -> list[str]:
    """A metadata column as strings ("" for a null or for a column the output does not have)."""
    if column not in table.column_names:
        return [""] * table.num_rows
    return ["" if v is None else str(v) for v in table.column(column).to_pylist()]


def check_checkpoint(output: str, checkpoint_id: str, checkpoint_name: str) -> None:
    """Refuse to use an index with another checkpoint than the one that built it (different embedding spaces)."""
    built_by = committed_index(output).get("checkpoint", {})
    if built_by.get("identity") != checkpoint_id:
        raise CheckpointMismatchError(
            f"{output} was embedded by checkpoint {built_by.get('uri')} (identity {built_by.get('identity')}), "
            f"not by {checkpoint_name} (identity {checkpoint_id}): their embedding spaces differ. Pass the "
            "checkpoint that built the index, or re-run `clap embed` with this one into a new --output")
