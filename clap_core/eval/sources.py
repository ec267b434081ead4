"""Evaluation clips from either input users have: a manifest (JSONL/CSV) or a folder of preprocessed shards.

    for item, rejected in iter_eval_items("shards/", split="test"):  # a decoded EvalItem, or its reject record
    for item, rejected in iter_eval_items("data/manifest.jsonl"):    # (clap_core.data.rejects.Reject)

Shard folders are recognised by their `manifest.json` (written last by `clap preprocess`) or by
`<split>/*.parquet` below them; anything else is read as a manifest file. Local paths and s3:// URIs.
"""
from __future__ import annotations

from typing import Iterator

from clap_core.audio.codec import MAX_CLIP_SECONDS, TARGET_SR, decode_audio
from clap_core.data.input_rows import audio_source, row_id
from clap_core.data.inputs import read_inputs
from clap_core.data.rejects import Reject, failure_reject, reject
from clap_core.data.shards import is_augmented_copy, is_shard_folder, iter_shard_rows
from clap_core.eval.evaluation import EvalItem
from clap_core.io_faults import retry_transient


def shard_row_to_item(row: dict, max_seconds: float | None = MAX_CLIP_SECONDS) -> EvalItem:
    wave, _ = decode_audio(row["audio"], mono=True, target_sr=TARGET_SR, max_seconds=max_seconds)  # (1, N)
    captions = list(row.get("captions") or [row["caption"]])
    return EvalItem(id=row["id"], wave=wave[0], captions=captions, label=row.get("label"))


def manifest_row_to_item(row: dict, max_seconds: float | None = MAX_CLIP_SECONDS) -> EvalItem:
    wave, _ = decode_audio(audio_source(row), mono=True, target_sr=TARGET_SR, max_seconds=max_seconds)
    captions = [c for c in row.get("captions") or [] if c]
    return EvalItem(id=row_id(row), wave=wave[0], captions=captions, label=row.get("label") or None)


def iter_eval_items(data: str, split: str | None = None, max_seconds: float | None = MAX_CLIP_SECONDS,
                    augmented: bool = False) -> Iterator[tuple[EvalItem | None, Reject | None]]:
    """(item, None) for every usable clip, (None, reject record) for every clip that cannot be used: a row the
    manifest reader rejected, an id seen before (duplicate_id: evaluated once), or any failure to read or
    decode the file (clap_core.data.rejects.failure_reject: one bad file is one reject, never the job).

    Shards: augmented copies are skipped unless `augmented`: a clip and its near-duplicates would compete
    for the same caption and cap R@1 (one row per source clip or segment)."""
    seen: set[str] = set()
    if is_shard_folder(data):
        rows = ((row, row["id"], shard_row_to_item) for row in iter_shard_rows(data, split)
                if augmented or not is_augmented_copy(row))
    else:
        rows = ((row, row_id(row), manifest_row_to_item) for row in read_inputs(data)
                if not (split and row.get("split") and row["split"] != split))
    for row, clip_id, convert in rows:
        record = {"id": clip_id, "source_path": row.get("source_path", "")}
        if row.get("error"):
            yield None, reject(record, "read_manifest", *row["error"])
        elif clip_id in seen:
            yield None, reject(record, "read_manifest", "duplicate_id",
                               f"id {clip_id!r} appeared earlier in the input: evaluated once")
        else:
            seen.add(clip_id)
            yield _convert(row, convert, record, max_seconds)


def _convert(row: dict, convert, record: dict, max_seconds) -> tuple[EvalItem | None, Reject | None]:
    try:  # a storage fault is retried, never a reject (clap_core.io_faults)
        what = str(row.get("audio_uri") or row.get("id", ""))
        return retry_transient(lambda: convert(row, max_seconds), what=what), None
    except Exception as e:  # decode errors, MemoryError, a bad file: one reject, never the job
        return None, failure_reject(record, e)  # storage faults are raised again
