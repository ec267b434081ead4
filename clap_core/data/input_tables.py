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
import re
from pathlib import PurePosixPath
from typing import Iterable, Iterator

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


CSV_BLOCK_BYTES = 8 << 20  # the CSV readers read the file this much at a time


def split_csv_lines(data: bytes, encoding: str, at_file_start: bool) -> Iterator[tuple[str, int]]:
    """Whole lines of `data` as text, each with the byte offset in `data` where it ends. Lines end after \n, \r\n
    or a lone \r, as csv's documented `open(..., newline="")` reads them; cut on bytes, which holds for encodings
    in which "\n" and "\r" are those bytes alone (input_chunks only cuts those)."""
    end = 0
    for raw in data.splitlines(keepends=True):  # bytes split at \n, \r\n and \r only (str.splitlines cuts more)
        text = decode_text(raw, encoding) if at_file_start and end == 0 else raw.decode(encoding, "surrogateescape")
        end += len(raw)
        yield text, end


def csv_lines(uri: str, encoding: str, start: int, end: int) -> Iterator[tuple[str, int]]:
    """The lines of the file's bytes [start, end), each with the file offset where it ends, read CSV_BLOCK_BYTES at
    a time: never the whole file in memory (a line longer than a block is read whole). `start` must be a line
    start."""
    pos = start
    while pos < end:
        block = more = storage.read_range(uri, pos, min(CSV_BLOCK_BYTES, end - pos))
        while b"\n" not in more and pos + len(block) < end:  # a line longer than a block
            more = storage.read_range(uri, pos + len(block), min(CSV_BLOCK_BYTES, end - pos - len(block)))
            block += more
        if pos + len(block) < end:  # whole lines only: cut after the block's last \n (a \r\n stays together)
            block = block[:block.rfind(b"\n") + 1]
        for line, stop in split_csv_lines(block, encoding, at_file_start=pos == 0):
            yield line, pos + stop
        pos += len(block)


def csv_header(fields: list[str]) -> tuple[list[str], list[str]]:
    """(header names stripped, the used columns it repeats): a repeated used column makes every row ambiguous."""
    header = [h.strip() for h in fields]
    duplicates = sorted({h for h in header if header.count(h) > 1 and (h in USED_COLUMNS or
                                                                      re.fullmatch(r"caption_\d+", h))})
    return header, duplicates


def csv_records_of(reader, header: list[str], first_line: int = 1) -> Iterator[dict]:
    """The records a csv reader gives after the header, as dicts; `first_line` is the file line number of the
    reader's first line (reject details). A record that cannot be used as is carries ERROR_KEY: a ragged row
    (more or fewer fields than the header), a malformed line, or duplicate used columns."""
    header, duplicates = csv_header(header)
    while True:
        line = reader.line_num + first_line
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield {ERROR_KEY: ("bad_manifest_row", f"line {line}: {e}")}
            continue
        if not fields:
            continue  # a blank line
        record = {h: v for h, v in zip(header, fields) if h and h not in duplicates}
        if duplicates:
            record[ERROR_KEY] = ("duplicate_column", f"the header repeats column(s) {duplicates}: ambiguous")
        elif len(fields) != len(header):
            record[ERROR_KEY] = ("ragged_row", f"line {line} has {len(fields)} fields, the header {len(header)}")
        yield record


def csv_reader(lines: Iterable[str], size: int):
    csv.field_size_limit(max(csv.field_size_limit(), size + 1))  # the default 131,072 killed the job
    return csv.reader(lines)


def read_csv_records(uri: str, encoding: str) -> tuple[list[str], list[dict]]:
    """Header and records of a whole CSV (read a block at a time; the records are held). Fields of any size parse."""
    size = storage.file_size(uri)
    reader = csv_reader((line for line, _ in csv_lines(uri, encoding, 0, size)), size)
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return [], []
    return csv_header(header)[0], list(csv_records_of(reader, header))


def csv_layout(header: list[str]) -> str:
    """"audiocaps" (rows of one youtube_id are one clip, anywhere in the file), "clotho" or "manifest", by the header."""
    names = set(csv_header(header)[0])
    if {"youtube_id", "caption"} <= names:
        return "audiocaps"
    return "clotho" if {"file_name", "caption_1"} <= names else "manifest"


def csv_chunk_bounds(uri: str, encoding: str, step_bytes: int) -> tuple[list[str], list[tuple[int, int]]] | None:
    """(raw header fields, byte ranges) cutting a generic CSV manifest into ranges of about step_bytes, each ending
    where a record ends as the csv module reads the file (quoted fields may hold newlines, and a quote inside an
    unquoted field is text: only a parse tells where records end). One pass over the file, a block at a time.
    None (read it whole) for a file of at most step_bytes (not parsed), one with no header, and AudioCaps and
    Clotho files."""
    size = storage.file_size(uri)
    if size <= step_bytes:
        return None
    read_to = [0]  # the file offset after the last line the reader took (it never reads past a record's end)

    def lines() -> Iterator[str]:
        for line, stop in csv_lines(uri, encoding, 0, size):
            read_to[0] = stop
            yield line

    reader = csv_reader(lines(), size)
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return None
    if csv_layout(header) != "manifest":
        return None
    bounds, start = [], 0  # the first range holds the header line
    while True:
        try:
            next(reader)
        except StopIteration:
            break
        except csv.Error:
            continue  # no cut right after a malformed line: the next record ends in a known state
        if read_to[0] - start >= step_bytes:
            bounds.append((start, read_to[0]))
            start = read_to[0]
    if start < size or not bounds:
        bounds.append((start, size))
    return header, bounds


def csv_chunk_records(uri: str, start: int, end: int, header: list[str], encoding: str = "utf-8",
                      first_line: int = 1) -> tuple[list[dict], int]:
    """(records, lines) of the byte range [start, end) of a CSV cut by csv_chunk_bounds: the records read_csv_records
    gives for those lines (the header skipped in the range that starts the file), and the lines the range holds."""
    lines = (line for line, _ in csv_lines(uri, encoding, start, end))
    reader = csv_reader(lines, end - start)
    if start == 0:
        try:
            next(reader)  # the header
        except (StopIteration, csv.Error):
            return [], reader.line_num
    records = list(csv_records_of(reader, header, first_line))
    return records, reader.line_num


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
    layout = csv_layout(header)
    if layout == "audiocaps":
        return audiocaps_rows(uri, records, audio_dir)
    if layout == "clotho":
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
