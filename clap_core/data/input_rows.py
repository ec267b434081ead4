"""The one row format every input reader produces (`InputRow`), and what is done with a row later: its
id, where its audio is. Readers: clap_core.data.input_tables (JSONL, CSV, AudioCaps, Clotho) and
clap_core.data.input_folders (sidecar folders, WebDataset tars); clap_core.data.inputs picks one.

    row = new_row(0, "audio/clip-1.flac", "/abs/corpus/audio/clip-1.flac", ["a dog barks"], language="en")
    row == {"id": None, "audio_uri": "/abs/corpus/audio/clip-1.flac", "source_path": "audio/clip-1.flac",
            "byte_offset": None, "byte_size": None, "caption": "a dog barks", "captions": ["a dog barks"],
            "language": "en", "label": None, "split": None, "kind": None, "row_index": 0, "error": None}

Rows stay plain dicts (millions of them are read, routed and serialised between Ray tasks): `InputRow`
documents their fields for type checkers and readers, at no cost at run time. Text is decoded with
surrogateescape (see `decode_text`), so undecodable bytes stay visible and are rejected later.
"""
from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import TypedDict

from clap_core import storage
from clap_core.audio.codec import AudioDecodeError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".mp4", ".webm", ".aac", ".aiff", ".aif")
ROW_FIELDS = ("id", "language", "label", "split", "kind")


class InputRow(TypedDict):
    """One input line or clip, as every reader returns it (make one with `new_row`)."""

    id: str | None  # as the input gives it (None: derived later by `row_id`)
    audio_uri: str | None  # local path or s3:// URI to read (a tar for WebDataset rows); None if unusable
    source_path: str  # the audio path as the input names it (reject rows and shards record it)
    byte_offset: int | None  # WebDataset: the audio member's offset in the tar
    byte_size: int | None  # WebDataset: the audio member's size
    caption: str  # main caption ("" when none)
    captions: list[str]  # every caption, main first
    language: str | None  # BCP-47 code
    label: str | None  # class label (zero-shot, probes)
    split: str | None  # train / valid / test / ... (None: input.default_split)
    kind: str | None  # "speech" / "env" as given (checked when planning)
    row_index: int  # position in the input (0-based, input order)
    error: tuple[str, str] | None  # (reason, detail) when the record could not be parsed: rejected


def new_row(row_index: int, source_path: str, audio_uri: str | None, captions: list[str], **fields) -> InputRow:
    """A row in the common format; `fields` fills id/language/label/split/kind/byte_offset/byte_size/error."""
    captions = [c for c in captions if c is not None]
    row = {"id": None, "audio_uri": audio_uri, "source_path": source_path, "byte_offset": None, "byte_size": None,
           "caption": captions[0] if captions else "", "captions": captions, "language": None, "label": None,
           "split": None, "kind": None, "row_index": row_index, "error": None}
    row.update({k: v for k, v in fields.items() if v is not None})
    return row


def escape_id(text: str) -> str:
    """Input ids never contain '#': it is reserved for the ids the pipeline makes ("<id>#seg<k>",
    "<id>#aug<k>"), so an input id "a#seg1" becomes "a%23seg1" ('%' -> '%25' keeps it reversible)."""
    return text.replace("%", "%25").replace("#", "%23")


def row_id(row: dict) -> str:
    """The row's id (escaped, see escape_id), or one derived from its audio path (without extension) or its
    position."""
    if row.get("id"):
        return escape_id(row["id"])
    return escape_id(row["source_path"].rsplit(".", 1)[0]) if row.get("source_path") else f"row-{row['row_index']}"


def audio_source(row: dict) -> str | bytes:
    """What `decode_audio` reads for a row: a local path, or the bytes of an s3:// object or a tar member."""
    uri = row["audio_uri"]
    try:
        if row.get("byte_offset") is not None:
            return storage.read_range(uri, row["byte_offset"], row["byte_size"])
        if storage.is_s3(uri):
            return storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise AudioDecodeError("missing_file", f"no such object: {uri}") from e
    return uri


def resolve_audio_path(base_dir: str, audio_path: str) -> str:
    """audio_path relative to the manifest's folder, absolute, or s3:// -> a URI readable by `storage`."""
    if storage.is_s3(audio_path) or audio_path.startswith("/"):
        return audio_path
    if storage.is_s3(base_dir):
        return storage.join(base_dir, audio_path)
    return str(PurePosixPath(base_dir) / audio_path)


def decode_text(data: bytes, encoding: str) -> str:
    text = data.decode(encoding, errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text  # Excel writes a UTF-8 BOM


def as_text(value) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def parse_json(text: str):
    """json.loads that turns too deep nesting (RecursionError) into a ValueError: one bad record, never the job."""
    try:
        return json.loads(text)
    except RecursionError as e:
        raise ValueError("JSON nested too deeply") from e
