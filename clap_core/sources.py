"""Audio rows from either input users have: a manifest (JSONL/CSV) or a folder of preprocessed shards.

    for row in iter_rows("shards/", split="test"): ...          # shard rows, FLAC bytes in row["audio"]
    for item, error in iter_eval_items("data/manifest.jsonl"):  # decoded EvalItems, or the reason they failed

Shard folders are recognised by their `manifest.json` (written last by `clap preprocess`) or by
`<split>/*.parquet` below them; anything else is read as a manifest file. Local paths and s3:// URIs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


from clap_core.audio_io import TARGET_SR, AudioDecodeError, decode_audio
from clap_core import storage
from clap_core.io_faults import retry_transient
from clap_core.evaluation import EvalItem
from clap_core.manifest import audio_source, read_manifest, row_id
from clap_core.shards import is_shard_folder, iter_shard_rows



@dataclass
class Rejected:
    id: str
    source_path: str
    reason: str
    detail: str


def shard_row_to_item(row: dict) -> EvalItem:
    wave, _ = decode_audio(row["audio"], mono=True, target_sr=TARGET_SR)  # (1, N); bad bytes -> AudioDecodeError
    captions = list(row.get("captions") or [row["caption"]])
    return EvalItem(id=row["id"], wave=wave[0], captions=captions, label=row.get("label"))


def manifest_row_to_item(row: dict) -> EvalItem:
    if row.get("error"):
        raise AudioDecodeError(*row["error"])
    wave, _ = decode_audio(audio_source(row), mono=True, target_sr=TARGET_SR)
    captions = [c for c in row.get("captions") or [] if c]
    return EvalItem(id=row_id(row), wave=wave[0], captions=captions, label=row.get("label") or None)


def iter_eval_items(data: str, split: str | None = None) -> Iterator[tuple[EvalItem | None, Rejected | None]]:
    """(item, None) for every usable clip, (None, Rejected) for every clip that cannot be decoded."""
    if is_shard_folder(data):
        for row in iter_shard_rows(data, split):
            yield _convert(row, shard_row_to_item, row.get("source_path", ""))
        return
    for row in read_manifest(data):
        if split and row.get("split") and row["split"] != split:
            continue
        yield _convert(row, manifest_row_to_item, row.get("source_path", ""))


def _convert(row: dict, convert, source: str) -> tuple[EvalItem | None, Rejected | None]:
    try:  # a storage fault is retried, never a reject (clap_core.io_faults)
        item = retry_transient(lambda: convert(row), what=str(row.get("audio_uri") or row.get("id", "")))
    except AudioDecodeError as e:  # NaN/inf, empty and undecodable audio all land here
        return None, Rejected(str(row.get("id", "")), str(source), e.reason, e.message)
    return item, None


def local_copy(uri: str, cache_root: str | None = None) -> str:
    """A local folder holding `uri`: the path itself, or an s3:// folder downloaded once into a cache."""
    if not uri.startswith("s3://"):
        return uri
    import hashlib
    import os
    import tempfile

    from pyarrow import fs

    root = cache_root or os.path.join(tempfile.gettempdir(), "clap-cache")
    target = os.path.join(root, hashlib.sha256(uri.encode()).hexdigest()[:16])
    if not os.path.isdir(target):
        remote, path = storage.resolve_fs(uri)
        partial = f"{target}.partial-{os.getpid()}"
        fs.copy_files(path, partial, source_filesystem=remote, destination_filesystem=fs.LocalFileSystem())
        os.replace(partial, target)  # a crash mid-download never leaves a half cache behind
    return target
