"""Input readers for tables: JSONL and CSV manifests, AudioCaps and Clotho CSVs (told apart by the header).
Every line or clip becomes one `clap_core.data.input_rows.InputRow`, in input order.

    JSONL / CSV manifest  audio_path (relative to the manifest, absolute or s3://), caption, optional id,
                          language, label, split, kind ("speech" / "env") and extra captions (`captions`
                          list in JSONL; `caption_2`, `caption_3`, ... columns in either)
    AudioCaps CSV         audiocap_id, youtube_id, start_time, caption; rows of one youtube_id are one clip
                          with several captions; audio is <youtube_id>.<ext> (also Y<youtube_id>, <audiocap_id>)
    Clotho CSV            file_name, caption_1 ... caption_5; audio is <file_name>

A line or record that cannot be used (bad JSON, ragged CSV row, caption past MAX_CAPTION_CHARS) is a
row with `error` set, never an exception: it is rejected at stage read_manifest.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import PurePosixPath

from clap_core import storage
from clap_core.data.input_rows import (
    AUDIO_SUFFIXES,
    ROW_FIELDS,
    InputRow,
    as_text,
    decode_text,
    new_row,
    parse_json,
    resolve_audio_path,
)

# split names found in corpus file names -> our split names
SPLIT_ALIASES = {"train": "train", "development": "train", "dev": "train", "val": "valid", "valid": "valid",
                 "validation": "valid", "eval": "test", "evaluation": "test", "test": "test"}


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


def row_from_record(record: dict, index: int, base_dir: str) -> InputRow:
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




def jsonl_block_rows(data: bytes, uri: str, encoding: str = "utf-8", first_index: int = 0,
                     first_line: int = 1) -> list[InputRow]:
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


def read_jsonl(uri: str, encoding: str = "utf-8", first_index: int = 0) -> list[InputRow]:
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


def read_csv(uri: str, encoding: str = "utf-8", audio_dir: str | None = None) -> list[InputRow]:
    """Generic, AudioCaps or Clotho CSV, told apart by the header."""
    header, records = read_csv_records(uri, encoding)
    if {"youtube_id", "caption"} <= set(header):
        return audiocaps_rows(uri, records, audio_dir)
    if {"file_name", "caption_1"} <= set(header):
        return clotho_rows(uri, records, audio_dir)
    base = storage.parent(uri)
    return [row_from_record(r, i, base) for i, r in enumerate(records)]


def error_row(index: int, record: dict, error: tuple[str, str]) -> InputRow:
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


def audiocaps_rows(uri: str, records: list[dict], audio_dir: str | None) -> list[InputRow]:
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


def clotho_rows(uri: str, records: list[dict], audio_dir: str | None) -> list[InputRow]:
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
