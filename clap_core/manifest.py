"""Input manifests and the corpus layouts users already have, read into one row format.

    rows = read_manifest("corpus/manifest.jsonl")      # or .csv, an AudioCaps/Clotho CSV, a folder, a .tar
    rows[0] == {"id": "clip-1", "audio_uri": "/abs/corpus/audio/clip-1.flac", "source_path": "audio/clip-1.flac",
                "byte_offset": None, "byte_size": None, "caption": "a dog barks", "captions": ["a dog barks"],
                "language": "en", "label": None, "split": None, "kind": None, "row_index": 0, "error": None}

Supported inputs (picked by `read_manifest` from the path and the CSV header):
    JSONL / CSV manifest  audio_path (relative to the manifest, absolute or s3://), caption, optional id,
                          language, label, split, kind ("speech" / "env") and extra captions (`captions`
                          list in JSONL; `caption_2`, `caption_3`, ... columns in either)
    AudioCaps CSV         audiocap_id, youtube_id, start_time, caption; rows of one youtube_id are one clip
                          with several captions; audio is <youtube_id>.<ext> (also Y<youtube_id>, <audiocap_id>)
    Clotho CSV            file_name, caption_1 ... caption_5; audio is <file_name>
    sidecar folder        audio files with <stem>.txt (one caption a line) or <stem>.json next to them
    WebDataset tars       LAION-CLAP style <key>.flac + <key>.json ({"text": str | [str], ...}); a .tar
                          or a folder of them; audio is read later as a byte range of the tar

Every input line or clip becomes exactly one row, in input order (`row_index`). Text is decoded as
UTF-8 (or `encoding`) with surrogateescape, so a caption with bytes invalid in that encoding stays
visible as such and is rejected later as `caption_not_utf8` instead of killing the read or being
silently mangled. A row that cannot even be parsed carries `error` = (reason, detail) and is rejected
at stage read_manifest. Nothing here checks audio files beyond finding them: decoding is per worker.
"""
from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from pathlib import PurePosixPath

from clap_core import storage
from clap_core.audio_io import AudioDecodeError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".mp4", ".webm", ".aac", ".aiff", ".aif")
ROW_FIELDS = ("id", "language", "label", "split", "kind")
# split names found in corpus file names -> our split names
SPLIT_ALIASES = {"train": "train", "development": "train", "dev": "train", "val": "valid", "valid": "valid",
                 "validation": "valid", "eval": "test", "evaluation": "test", "test": "test"}


def new_row(row_index: int, source_path: str, audio_uri: str | None, captions: list[str], **fields) -> dict:
    """A row in the common format; `fields` fills id/language/label/split/kind/byte_offset/byte_size/error."""
    captions = [c for c in captions if c is not None]
    row = {"id": None, "audio_uri": audio_uri, "source_path": source_path, "byte_offset": None, "byte_size": None,
           "caption": captions[0] if captions else "", "captions": captions, "language": None, "label": None,
           "split": None, "kind": None, "row_index": row_index, "error": None}
    row.update({k: v for k, v in fields.items() if v is not None})
    return row


def row_id(row: dict) -> str:
    """The row's id, or one derived from its audio path (without extension) or its position."""
    if row.get("id"):
        return row["id"]
    return row["source_path"].rsplit(".", 1)[0] if row.get("source_path") else f"row-{row['row_index']}"


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


def split_from_name(name: str) -> str | None:
    """'clotho_captions_evaluation.csv' -> 'test', 'val.csv' -> 'valid'."""
    for word in re.split(r"[^a-z]+", PurePosixPath(name).stem.lower()):
        if word in SPLIT_ALIASES:
            return SPLIT_ALIASES[word]
    return None


def extra_captions(record: dict) -> list[str]:
    """caption_2, caption_3, ... in numeric order (caption_1 is the main caption in Clotho)."""
    keys = sorted((int(m.group(1)), k) for k in record if (m := re.fullmatch(r"caption_(\d+)", str(k))))
    return [record[k] for _, k in keys if record[k] not in (None, "")]


# -------------------------------------------------------------------------------------------------
# JSONL and generic CSV manifests


def row_from_record(record: dict, index: int, base_dir: str) -> dict:
    """One manifest record (dict from a JSON line or CSV row) -> row."""
    audio_path = as_text(record.get("audio_path"))
    fields = {k: as_text(record.get(k)) or None for k in ROW_FIELDS}
    listed = record.get("captions")
    captions = [as_text(record.get("caption"))] if record.get("caption") is not None else []
    captions += [as_text(c) for c in listed if c != record.get("caption")] if isinstance(listed, list) else []
    captions += [as_text(c) for c in extra_captions(record)]
    if not audio_path:
        return new_row(index, "", None, captions, error=("missing_audio_path", "row has no audio_path"), **fields)
    return new_row(index, audio_path, resolve_audio_path(base_dir, audio_path), captions, **fields)


def read_jsonl(uri: str, encoding: str = "utf-8") -> list[dict]:
    base = storage.parent(uri)
    rows = []
    for line in decode_text(storage.read_bytes(uri), encoding).splitlines():
        if not line.strip():
            continue
        index = len(rows)
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected an object, got {type(record).__name__}")
        except ValueError as e:
            rows.append(new_row(index, "", None, [], error=("bad_manifest_row", f"line {index + 1}: {e}")))
            continue
        rows.append(row_from_record(record, index, base))
    return rows


def read_csv_records(uri: str, encoding: str) -> tuple[list[str], list[dict]]:
    text = decode_text(storage.read_bytes(uri), encoding)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = list(reader)
    return [h.strip() for h in reader.fieldnames or []], [{k.strip(): v for k, v in r.items() if k} for r in records]


def read_csv(uri: str, encoding: str = "utf-8", audio_dir: str | None = None) -> list[dict]:
    """Generic, AudioCaps or Clotho CSV, told apart by the header."""
    header, records = read_csv_records(uri, encoding)
    if {"youtube_id", "caption"} <= set(header):
        return audiocaps_rows(uri, records, audio_dir)
    if {"file_name", "caption_1"} <= set(header):
        return clotho_rows(uri, records, audio_dir)
    base = storage.parent(uri)
    return [row_from_record(r, i, base) for i, r in enumerate(records)]


# -------------------------------------------------------------------------------------------------
# AudioCaps and Clotho


def audio_dir_candidates(uri: str, split: str | None, audio_dir: str | None) -> list[str]:
    if audio_dir:
        return [audio_dir]
    base = storage.parent(uri)
    names = [split, PurePosixPath(uri).stem, "audio", ""] if split else ["audio", ""]
    return [storage.join(base, n) if n else base for n in names]


def find_audio(dirs: list[str], stems: list[str], suffixes: tuple[str, ...]) -> str:
    """First existing dir/stem+suffix; otherwise the first candidate (it is rejected as missing_file)."""
    for d in dirs:
        for stem in stems:
            for suffix in suffixes:
                candidate = storage.join(d, stem + suffix)
                if not storage.is_s3(candidate) and storage.exists(candidate):
                    return candidate
    return storage.join(dirs[0], stems[0] + suffixes[0])


def audiocaps_rows(uri: str, records: list[dict], audio_dir: str | None) -> list[dict]:
    """Rows of one youtube_id are one clip; the first caption is the main one."""
    split = split_from_name(uri)
    dirs = audio_dir_candidates(uri, split, audio_dir)
    clips: dict[str, list[dict]] = {}
    for r in records:
        clips.setdefault(r.get("youtube_id") or "", []).append(r)
    rows = []
    for youtube_id, group in clips.items():
        index = len(rows)
        captions = [r.get("caption") or "" for r in group]
        if not youtube_id:
            rows.append(new_row(index, "", None, captions, error=("missing_audio_path", "row has no youtube_id")))
            continue
        stems = [youtube_id, f"Y{youtube_id}", *(r["audiocap_id"] for r in group if r.get("audiocap_id"))]
        path = find_audio(dirs, stems, AUDIO_SUFFIXES)
        rows.append(new_row(index, path, path, captions, id=youtube_id, split=split, language="en", kind="env"))
    return rows


def clotho_rows(uri: str, records: list[dict], audio_dir: str | None) -> list[dict]:
    split = split_from_name(uri)
    dirs = audio_dir_candidates(uri, split, audio_dir)
    rows = []
    for index, r in enumerate(records):
        name = r.get("file_name") or ""
        captions = [r.get(f"caption_{k}") or "" for k in range(1, 6) if f"caption_{k}" in r]
        if not name:
            rows.append(new_row(index, "", None, captions, error=("missing_audio_path", "row has no file_name")))
            continue
        path = find_audio(dirs, [name], ("",))
        rows.append(new_row(index, path, path, captions, id=PurePosixPath(name).stem, split=split, language="en",
                            kind="env"))
    return rows


# -------------------------------------------------------------------------------------------------
# folder of audio files with sidecar captions


def sidecar_fields(data: bytes, suffix: str, encoding: str) -> tuple[list[str], dict]:
    """Captions and extra fields from a .txt (one caption a line) or .json sidecar."""
    text = decode_text(data, encoding)
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()], {}
    record = json.loads(text)
    captions = record.get("captions") or record.get("text") or record.get("caption") or []
    captions = [captions] if isinstance(captions, str) else [as_text(c) for c in captions]
    return captions, {k: as_text(record.get(k)) or None for k in ROW_FIELDS}


def read_sidecar_folder(uri: str, encoding: str = "utf-8") -> list[dict]:
    """Each audio file is a row, id = its path relative to the folder without the suffix."""
    root = uri.rstrip("/")
    files = storage.list_files(root)
    by_stem = {f.rsplit(".", 1)[0]: f for f in files if f.lower().endswith((".txt", ".json"))}
    audio = [f for f in files if f.lower().endswith(AUDIO_SUFFIXES)]
    rows = []
    for index, path in enumerate(audio):
        stem = path.rsplit(".", 1)[0]
        rel = path[len(root) + 1:]
        clip_id = rel.rsplit(".", 1)[0]
        sidecar = by_stem.get(stem)
        if sidecar is None:
            rows.append(new_row(index, rel, path, [], id=clip_id, error=("missing_caption", "no .txt/.json sidecar")))
            continue
        try:
            captions, fields = sidecar_fields(storage.read_bytes(sidecar), "." + sidecar.rsplit(".", 1)[1].lower(),
                                              encoding)
        except ValueError as e:
            rows.append(new_row(index, rel, path, [], id=clip_id, error=("bad_manifest_row", f"{sidecar}: {e}")))
            continue
        fields["id"] = fields.get("id") or clip_id
        rows.append(new_row(index, rel, path, captions, **fields))
    return rows


# -------------------------------------------------------------------------------------------------
# WebDataset tar shards (LAION-CLAP layout)


def tar_members(uri: str) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    """Members of a tar read as one stream (works on S3 without a local copy) and the bytes of its
    .json members (captions are small: keep them now, the audio stays in the tar)."""
    fs, path = storage.resolve_fs(uri)
    members, metadata = [], {}
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if m.isfile() and m.name.lower().endswith(".json"):
                metadata[m.name] = tar.extractfile(m).read()
            members.append(m)
    return members, metadata


def webdataset_rows(uri: str, first_index: int, encoding: str) -> list[dict]:
    """One row per sample key with an audio member; audio stays in the tar as (offset, size)."""
    members, metadata = tar_members(uri)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in members:
        if m.isfile() and "." in m.name:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext.lower()] = m
    rows = []
    for key, parts in samples.items():
        index = first_index + len(rows)
        audio = next((parts[e] for e in parts if "." + e in AUDIO_SUFFIXES), None)
        if audio is None:
            continue  # a sample without audio is not a clip (e.g. a stray metadata file)
        source = f"{uri}#{audio.name}"
        extra = {"byte_offset": audio.offset_data, "byte_size": audio.size, "id": key}
        meta = parts.get("json")
        if meta is None:
            rows.append(new_row(index, source, uri, [], error=("missing_caption", "no .json in sample"), **extra))
            continue
        try:
            captions, fields = sidecar_fields(metadata[meta.name], ".json", encoding)
        except ValueError as e:
            rows.append(new_row(index, source, uri, [], error=("bad_manifest_row", f"{meta.name}: {e}"), **extra))
            continue
        extra["id"] = fields.pop("id", None) or extra["id"]
        rows.append(new_row(index, source, uri, captions, **extra, **fields))
    return rows


def read_webdataset(uris: list[str], encoding: str = "utf-8") -> list[dict]:
    rows = []
    for uri in uris:
        rows += webdataset_rows(uri, len(rows), encoding)
    return rows


# -------------------------------------------------------------------------------------------------
# entry point


def read_manifest(path: str, encoding: str = "utf-8", audio_dir: str | None = None) -> list[dict]:
    """Rows of any supported input (see the module docstring), in input order."""
    path = str(path)
    uri = path if storage.is_s3(path) else storage.resolve_fs(path)[1]
    lower = uri.lower()
    if lower.endswith((".jsonl", ".json")):
        return read_jsonl(uri, encoding)
    if lower.endswith(".csv"):
        return read_csv(uri, encoding, audio_dir)
    if lower.endswith(".tar"):
        return read_webdataset([uri], encoding)
    if not storage.is_dir(uri) and not storage.is_s3(uri):
        raise FileNotFoundError(f"input not found or of unknown kind: {path}")
    tars = [f for f in storage.list_files(uri) if f.lower().endswith(".tar")]
    return read_webdataset(tars, encoding) if tars else read_sidecar_folder(uri, encoding)
