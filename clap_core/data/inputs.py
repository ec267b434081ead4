"""Input manifests and the corpus layouts users already have, read into one row format.

    rows = read_manifest("corpus/manifest.jsonl")      # or .csv, an AudioCaps/Clotho CSV, a folder, a .tar
    rows[0] == {"id": "clip-1", "audio_uri": "/abs/corpus/audio/clip-1.flac", "source_path": "audio/clip-1.flac",
                "byte_offset": None, "byte_size": None, "caption": "a dog barks", "captions": ["a dog barks"],
                "language": "en", "label": None, "split": None, "kind": None, "row_index": 0, "error": None}

Supported inputs (picked by `read_manifest` from the path and the CSV header):
    JSONL / CSV manifest  (or a folder of .jsonl manifest parts, read in name order) audio_path (relative to the manifest, absolute or s3://), caption, optional id,
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
import os
import re
import tarfile
from pathlib import PurePosixPath

from clap_core import storage
from clap_core.audio.codec import AudioDecodeError, check_local_file

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


def split_word(name: str) -> str | None:
    """The split word as the file names it: 'clotho_captions_development.csv' -> 'development'."""
    for word in re.split(r"[^a-z]+", PurePosixPath(name).stem.lower()):
        if word in SPLIT_ALIASES:
            return word
    return None


def split_from_name(name: str) -> str | None:
    """'clotho_captions_evaluation.csv' -> 'test', 'val.csv' -> 'valid'."""
    word = split_word(name)
    return SPLIT_ALIASES[word] if word else None


def extra_captions(record: dict) -> list[str]:
    """caption_2, caption_3, ... in numeric order (caption_1 is the main caption in Clotho)."""
    keys = sorted((int(m.group(1)), k) for k in record if (m := re.fullmatch(r"caption_(\d+)", str(k))))
    return [record[k] for _, k in keys if record[k] not in (None, "")]


# -------------------------------------------------------------------------------------------------
# JSONL and generic CSV manifests


def row_from_record(record: dict, index: int, base_dir: str) -> dict:
    """One manifest record (dict from a JSON line or CSV row) -> row."""
    error = record_error(record)
    if error:
        return error_row(index, record, error)
    audio_path = as_text(record.get("audio_path"))
    fields = {k: as_text(record.get(k)) or None for k in ROW_FIELDS}
    listed = record.get("captions")
    captions = [as_text(record.get("caption"))] if record.get("caption") is not None else []
    captions += [as_text(c) for c in listed if c != record.get("caption")] if isinstance(listed, list) else []
    captions += [as_text(c) for c in extra_captions(record)]
    if not audio_path:
        return new_row(index, "", None, captions, error=("missing_audio_path", "row has no audio_path"), **fields)
    return new_row(index, audio_path, resolve_audio_path(base_dir, audio_path), captions, **fields)


def parse_json(text: str):
    """json.loads that turns too deep nesting (RecursionError) into a ValueError: one bad record, never the job."""
    try:
        return json.loads(text)
    except RecursionError as e:
        raise ValueError("JSON nested too deeply") from e


def jsonl_block_rows(data: bytes, uri: str, encoding: str = "utf-8", first_index: int = 0,
                     first_line: int = 1) -> list[dict]:
    """Rows of whole JSONL lines (a file, or a byte range of one cut after a newline), numbered from
    first_index; first_line is the file line number of the block's first line (for reject details).
    Lines are split on newline bytes only: U+2028, U+0085 and friends are valid inside JSON strings
    (str.splitlines would cut a line there)."""
    base = storage.parent(uri)
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=first_line):
        line = decode_text(raw, encoding) if number == 1 else raw.decode(encoding, errors="surrogateescape")
        if not line.strip():
            continue
        index = first_index + len(rows)
        try:
            record = parse_json(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected an object, got {type(record).__name__}")
        except ValueError as e:
            rows.append(new_row(index, "", None, [], error=("bad_manifest_row", f"line {number}: {str(e)[:500]}")))
            continue
        rows.append(row_from_record(record, index, base))
    return rows


def read_jsonl(uri: str, encoding: str = "utf-8", first_index: int = 0) -> list[dict]:
    return jsonl_block_rows(storage.read_bytes(uri), uri, encoding, first_index)


MAX_CAPTION_CHARS = 65_536  # a longer caption is rejected (caption_too_long); tokenizers keep ~100 words
# Columns the readers use: a duplicate of one of them makes every row ambiguous (duplicate_column).
USED_COLUMNS = {"audio_path", "caption", "captions", "youtube_id", "audiocap_id", "file_name", *ROW_FIELDS}
ERROR_KEY = "\x00error"  # a CSV record the reader could not take as is: (reason, detail)


def read_csv_records(uri: str, encoding: str) -> tuple[list[str], list[dict]]:
    """Header and records; a record that cannot be used as is carries ERROR_KEY: a ragged row (more or
    fewer fields than the header), a malformed line, or duplicate used columns. Fields of any size parse."""
    text = decode_text(storage.read_bytes(uri), encoding)
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # the default 131,072 killed the job
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except (StopIteration, csv.Error):
        return [], []
    duplicates = sorted({h for h in header if header.count(h) > 1 and (h in USED_COLUMNS or
                                                                      re.fullmatch(r"caption_\d+", h))})
    records = []
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            records.append({ERROR_KEY: ("bad_manifest_row", f"line {line}: {e}")})
            continue
        if not fields:
            continue  # a blank line
        record = {h: v for h, v in zip(header, fields) if h and h not in duplicates}
        if duplicates:
            record[ERROR_KEY] = ("duplicate_column", f"the header repeats column(s) {duplicates}: ambiguous")
        elif len(fields) != len(header):
            record[ERROR_KEY] = ("ragged_row", f"line {line} has {len(fields)} fields, the header {len(header)}")
        records.append(record)
    return header, records


def record_error(record: dict) -> tuple[str, str] | None:
    """(reason, detail) when a CSV record cannot be used, including a caption past MAX_CAPTION_CHARS."""
    if record.get(ERROR_KEY):
        return record[ERROR_KEY]
    long = [k for k, v in record.items() if k.startswith("caption") and isinstance(v, str) and len(v) > MAX_CAPTION_CHARS]
    if long:
        return "caption_too_long", f"{long[0]} has {len(record[long[0]])} characters > {MAX_CAPTION_CHARS}"
    return None


def read_csv(uri: str, encoding: str = "utf-8", audio_dir: str | None = None) -> list[dict]:
    """Generic, AudioCaps or Clotho CSV, told apart by the header."""
    header, records = read_csv_records(uri, encoding)
    if {"youtube_id", "caption"} <= set(header):
        return audiocaps_rows(uri, records, audio_dir)
    if {"file_name", "caption_1"} <= set(header):
        return clotho_rows(uri, records, audio_dir)
    base = storage.parent(uri)
    return [row_from_record(r, i, base) for i, r in enumerate(records)]


def error_row(index: int, record: dict, error: tuple[str, str]) -> dict:
    """A row for a record that cannot be used: kept (with what can be read of it) and rejected."""
    path = as_text(record.get("audio_path") or record.get("file_name") or record.get("youtube_id")) or ""
    return new_row(index, path, None, [], id=as_text(record.get("id")) or None, error=error)


# -------------------------------------------------------------------------------------------------
# AudioCaps and Clotho


def audio_dir_candidates(uri: str, split: str | None, audio_dir: str | None) -> list[str]:
    """Folders beside the CSV that may hold its audio: the split as the file names it (Clotho's official
    layout: clotho_captions_development.csv beside development/), the normalised split, the CSV's stem, audio/."""
    if audio_dir:
        return [audio_dir]
    base = storage.parent(uri)
    names = [split_word(uri), split, PurePosixPath(uri).stem, "audio", ""] if split else ["audio", ""]
    return [storage.join(base, n) if n else base for n in dict.fromkeys(names)]


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
    rows = []
    for r in records:
        error = record_error(r)
        if error:
            rows.append(error_row(len(rows), r, error))
        else:
            clips.setdefault(r.get("youtube_id") or "", []).append(r)
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
        error = record_error(r)
        if error:
            rows.append(error_row(index, r, error))
            continue
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
    record = parse_json(text)
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    captions = record.get("captions") or record.get("text") or record.get("caption") or []
    captions = [captions] if isinstance(captions, str) else [as_text(c) for c in captions]
    return captions, {k: as_text(record.get(k)) or None for k in ROW_FIELDS}


def folder_entries(root: str) -> list[tuple[str, tuple[str, str] | None]]:
    """(path, problem) for every entry below a folder, sorted; problem = (reason, detail) for an audio-named
    entry that is not a regular file (is_directory, fifo, device, symlink_loop, ...). Local folders are
    walked without following symlinked folders (a loop can never list a clip twice); nothing is opened."""
    if storage.is_s3(root):
        return [(f, None) for f in storage.list_files(root)]
    entries = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in files + [d for d in dirs if d.lower().endswith(AUDIO_SUFFIXES)]:
            path = os.path.join(folder, name)
            problem = None
            if name.lower().endswith(AUDIO_SUFFIXES + (".txt", ".json")):
                try:
                    check_local_file(path)
                except AudioDecodeError as e:
                    problem = (e.reason, e.message)
            entries.append((path, problem))
    return sorted(entries)


def read_sidecar_folder(uri: str, encoding: str = "utf-8") -> list[dict]:
    """Each audio file is a row, id = its path relative to the folder without the suffix."""
    root = uri.rstrip("/")
    entries = folder_entries(root)
    by_stem = {f.rsplit(".", 1)[0]: (f, problem) for f, problem in entries if f.lower().endswith((".txt", ".json"))}
    audio = [(f, problem) for f, problem in entries if f.lower().endswith(AUDIO_SUFFIXES)]
    rows = []
    for index, (path, problem) in enumerate(audio):
        stem = path.rsplit(".", 1)[0]
        rel = path[len(root) + 1:]
        clip_id = rel.rsplit(".", 1)[0]
        if problem is not None:  # a folder, FIFO, device or loop named like audio: never opened
            rows.append(new_row(index, rel, path, [], id=clip_id, error=problem))
            continue
        sidecar, sidecar_problem = by_stem.get(stem, (None, None))
        if sidecar is None:
            rows.append(new_row(index, rel, path, [], id=clip_id, error=("missing_caption", "no .txt/.json sidecar")))
            continue
        if sidecar_problem is not None:
            rows.append(new_row(index, rel, path, [], id=clip_id,
                                error=("bad_sidecar", f"{sidecar}: {sidecar_problem[1]}")))
            continue
        try:
            if not storage.is_s3(sidecar) and os.path.getsize(sidecar) > MAX_METADATA_BYTES:
                raise ValueError(f"larger than {MAX_METADATA_BYTES} bytes: not read")
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


MAX_METADATA_BYTES = 16 << 20  # a .json member or sidecar larger than this is not read (bad_manifest_row)


def tar_members(uri: str) -> tuple[list[tarfile.TarInfo], dict[str, bytes], str | None]:
    """Members of a tar read as one stream (works on S3 without a local copy), the bytes of its .json
    members (captions are small: keep them now, the audio stays in the tar), and why reading stopped
    early (a truncated or corrupt tar keeps the members before the damage), else None."""
    fs, path = storage.resolve_fs(uri)
    members, metadata = [], {}
    try:
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if m.isfile() and m.name.lower().endswith(".json") and m.size <= MAX_METADATA_BYTES:
                    metadata[m.name] = tar.extractfile(m).read()
                members.append(m)
    except (tarfile.TarError, EOFError) as e:
        return members, metadata, f"{type(e).__name__}: {e}"
    return members, metadata, None


def sample_key(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: the key is the member path up to the first dot of its basename (the folder is
    kept: "shard.v2/a.flac" -> ("shard.v2/a", "flac")); None when the basename has no extension."""
    folder, _, base = name.rpartition("/")
    if "." not in base.lstrip("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def webdataset_rows(uri: str, first_index: int, encoding: str) -> list[dict]:
    """One row per sample key, in tar order; audio stays in the tar as (offset, size). Every member is
    accounted for: a sample without exactly one audio member, a repeated member, a member without an
    extension or one that is not a regular file (link, device) becomes a rejected row."""
    members, metadata, damage = tar_members(uri)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    problems: dict[str, tuple[str, str]] = {}
    for m in members:
        if m.isdir():
            continue  # folders are structure, not content
        key_ext = sample_key(m.name)
        key, ext = key_ext if key_ext else (m.name, "")
        parts = samples.setdefault(key, {})
        if not m.isfile():
            problems.setdefault(key, ("not_regular_member", f"{m.name} is a link or special file in the tar"))
        elif key_ext is None:
            problems.setdefault(key, ("no_extension", f"{m.name} has no extension: no sample key"))
        elif ext in parts:
            problems.setdefault(key, ("duplicate_member", f"{m.name} appears twice in the tar"))
        parts[ext] = m
    rows = []
    for key, parts in samples.items():
        index = first_index + len(rows)
        audio_parts = [parts[e] for e in parts if "." + e in AUDIO_SUFFIXES and parts[e].isfile()]
        audio = audio_parts[0] if audio_parts else None
        source = f"{uri}#{audio.name if audio else key}"
        extra = {"byte_offset": audio.offset_data if audio else None, "byte_size": audio.size if audio else None,
                 "id": key}
        problem = problems.get(key)
        if problem is None and not audio_parts:
            problem = ("no_audio_member", f"sample {key} has no audio member ({', '.join(sorted(parts))})")
        if problem is None and len(audio_parts) > 1:
            problem = ("several_audio_members", f"sample {key} has {', '.join(m.name for m in audio_parts)}")
        if problem is not None:
            rows.append(new_row(index, source, uri if audio else None, [], error=problem, **extra))
            continue
        meta = parts.get("json")
        if meta is None:
            rows.append(new_row(index, source, uri, [], error=("missing_caption", "no .json in sample"), **extra))
            continue
        try:
            if meta.name not in metadata:
                raise ValueError(f"{meta.size} bytes > {MAX_METADATA_BYTES}: not read")
            captions, fields = sidecar_fields(metadata[meta.name], ".json", encoding)
        except ValueError as e:
            rows.append(new_row(index, source, uri, [], error=("bad_manifest_row", f"{meta.name}: {e}"), **extra))
            continue
        extra["id"] = fields.pop("id", None) or extra["id"]
        rows.append(new_row(index, source, uri, captions, **extra, **fields))
    if damage:  # whatever followed the damage cannot be listed: one row says so
        rows.append(new_row(first_index + len(rows), f"{uri}#<after {len(members)} members>", None, [],
                            id=f"{PurePosixPath(uri).name}#damaged", error=("bad_tar", damage)))
    return rows


def read_webdataset(uris: list[str], encoding: str = "utf-8") -> list[dict]:
    rows = []
    for uri in uris:
        rows += webdataset_rows(uri, len(rows), encoding)
    return rows


# -------------------------------------------------------------------------------------------------
# entry point


def resolve_input(path: str) -> tuple[str, list[str]]:
    """(kind, files) of an input: "jsonl" (a manifest, or a folder of .jsonl manifest parts read in name
    order), "csv", "tar" (a .tar or a folder of them) or "sidecar" (a folder of audio + captions)."""
    path = str(path)
    uri = path if storage.is_s3(path) else storage.resolve_fs(path)[1]
    lower = uri.lower()
    if lower.endswith((".jsonl", ".json")):
        return "jsonl", [uri]
    if lower.endswith(".csv"):
        return "csv", [uri]
    if lower.endswith(".tar"):
        return "tar", [uri]
    if not storage.is_dir(uri) and not storage.is_s3(uri):
        raise FileNotFoundError(f"input not found or of unknown kind: {path}")
    files = storage.list_files(uri)
    tars = [f for f in files if f.lower().endswith(".tar")]
    if tars:
        return "tar", tars
    parts = [f for f in files if f.lower().endswith(".jsonl")]
    if parts and not any(f.lower().endswith(AUDIO_SUFFIXES) for f in files):
        return "jsonl", parts
    return "sidecar", [uri]


def read_manifest(path: str, encoding: str = "utf-8", audio_dir: str | None = None) -> list[dict]:
    """Rows of any supported input (see the module docstring), in input order."""
    kind, files = resolve_input(path)
    if kind == "jsonl":
        rows = []
        for uri in files:
            rows += read_jsonl(uri, encoding, len(rows))
        return rows
    if kind == "csv":
        return read_csv(files[0], encoding, audio_dir)
    if kind == "tar":
        return read_webdataset(files, encoding)
    return read_sidecar_folder(files[0], encoding)
