"""An input manifest cut into chunks that tasks read independently (`clap preprocess`'s planning, `clap embed`'s
Ray job on a big manifest), so no process holds all its rows:

    chunks = input_chunks(input_uri, chunk_mb=64)        # JSONL / CSV byte ranges, a tar each, sidecar folder parts
    firsts = chunk_starts(chunks, [count_lines(c) for c in chunks])  # rows per chunk -> where each one starts
    rows = read_chunk(chunks[i], firsts[i])              # the rows of one chunk, numbered as read_inputs numbers them

A chunk is a JSON-able dict (it travels to Ray tasks). Reading every chunk in order gives read_inputs' rows.
"""
from __future__ import annotations

from clap_core import storage
from clap_core.data.input_folders import sidecar_chunk_rows, sidecar_chunks, webdataset_rows
from clap_core.data.input_rows import InputRow, decode_text
from clap_core.data.input_tables import csv_chunk_bounds, csv_chunk_records, jsonl_block_rows, row_from_record
from clap_core.data.inputs import ResolvedInput, read_inputs, resolve_input
from clap_core.io_faults import retry_transient


def input_chunks(input_uri: str, chunk_mb: float, encoding: str = "utf-8",
                 resolved: ResolvedInput | None = None) -> list[dict]:
    """Pieces of the input that tasks read independently, in input order. JSONL files are cut into byte
    ranges of about chunk_mb (lines belong to the range they start in); a CSV manifest bigger than chunk_mb into
    ranges that end where a record ends (found by one streaming parse of the file here: quoted fields may hold
    newlines); each tar is one chunk; a sidecar folder's listing (resolve_input's) is cut into chunks of
    SIDECAR_CHUNK_CLIPS audio files, each carrying its files' paths and the sidecars of their stems; a smaller
    CSV, and AudioCaps and Clotho CSVs (rows of one clip are grouped across the file), are one chunk read whole.
    `resolved`: resolve_input(input_uri) when the caller has it (a folder is then not listed again)."""
    kind, files, listing = resolved or resolve_input(input_uri)
    step = max(1, int(chunk_mb * 1e6))
    byte_lines = "\n".encode(encoding) == b"\n" and "\r".encode(encoding) == b"\r"  # cut on bytes
    if kind == "jsonl" and byte_lines:
        chunks = []
        for uri in files:
            size = storage.file_size(uri)
            chunks += [{"kind": "jsonl", "uri": uri, "start": s, "end": min(s + step, size), "size": size}
                       for s in range(0, max(size, 1), step)]
        return chunks
    if kind == "csv" and byte_lines:
        uri = files[0]
        cut = retry_transient(lambda: csv_chunk_bounds(uri, encoding, step), what=f"cutting {uri} into chunks")
        if cut is not None:
            header, bounds = cut
            return [{"kind": "csv", "uri": uri, "start": s, "end": e, "header": header} for s, e in bounds]
    if kind == "tar":
        return [{"kind": "tar", "uri": uri} for uri in files]
    if kind == "sidecar":  # counted from the chunk's listing alone (count_lines), its sidecars read once
        return sidecar_chunks(files[0], listing=listing)
    return [{"kind": "whole", "uri": input_uri}]


def line_block(uri: str, start: int, end: int, size: int) -> bytes:
    """The bytes of the lines of a file that start in [start, end)."""
    head = start
    if start > 0:
        probe = storage.read_range(uri, start - 1, end - start + 1)
        newline = probe.find(b"\n")
        if newline < 0:
            return b""  # one line runs through the whole range: it belongs to an earlier chunk
        head = start + newline
    if head >= end:
        return b""
    data, pos = storage.read_range(uri, head, end - head), end
    while not data.endswith(b"\n") and pos < size:  # finish the last line
        more = storage.read_range(uri, pos, min(1 << 16, size - pos))
        cut = more.find(b"\n")
        data += more if cut < 0 else more[:cut + 1]
        pos = size if cut >= 0 else pos + len(more)
    return data


def read_chunk(chunk: dict, first_index: int, encoding: str = "utf-8",
               audio_dir: str | None = None) -> list[InputRow]:
    """Input rows of one chunk, numbered from first_index."""
    enc = encoding
    if chunk["kind"] == "jsonl":
        data = line_block(chunk["uri"], chunk["start"], chunk["end"], chunk["size"])
        return jsonl_block_rows(data, chunk["uri"], enc, first_index, chunk.get("first_line", 1))
    if chunk["kind"] == "csv":
        records, _ = csv_block(chunk, enc)
        base = storage.parent(chunk["uri"])
        return [row_from_record(record, first_index + i, base) for i, record in enumerate(records)]
    if chunk["kind"] == "tar":
        return webdataset_rows(chunk["uri"], first_index, enc)
    if chunk["kind"] == "sidecar":
        return sidecar_chunk_rows(chunk, first_index, enc)
    return read_inputs(chunk["uri"], enc, audio_dir)


def csv_block(chunk: dict, encoding: str) -> tuple[list[dict], int]:
    return csv_chunk_records(chunk["uri"], chunk["start"], chunk["end"], chunk["header"], encoding,
                             chunk.get("first_line", 1))


def count_lines(chunk: dict, encoding: str = "utf-8", audio_dir: str | None = None) -> tuple[int, int]:
    """(rows, lines) of a chunk; JSONL lines are counted without parsing them, by the rule of jsonl_block_rows
    (newline bytes only; blank lines are no rows); CSV records are parsed, lines counted as csv counts them."""
    if chunk["kind"] == "jsonl":
        data = line_block(chunk["uri"], chunk["start"], chunk["end"], chunk["size"])
        enc = encoding
        rows = sum(1 for i, raw in enumerate(data.split(b"\n")) if
                   (decode_text(raw, enc) if i == 0 and chunk["start"] == 0 else
                    raw.decode(enc, errors="surrogateescape")).strip())
        return rows, data.count(b"\n")
    if chunk["kind"] == "csv":  # records and the lines they span (a quoted field may hold newlines)
        records, lines = csv_block(chunk, encoding)
        return len(records), lines
    if chunk["kind"] == "sidecar":  # a row per audio file: the chunk's listing says how many, no sidecar is read
        return len(chunk["audio"]), 0
    return len(read_chunk(chunk, 0, encoding, audio_dir)), 0


def chunk_starts(chunks: list[dict], counted: list[tuple[int, int]]) -> list[int]:
    """Stage 0's (rows, lines) of each chunk -> where each chunk's rows start in input order (returned),
    and each chunk's "first_line": the file line number of its first line (reject details), counted per file."""
    firsts, rows, lines_before = [], 0, {}
    for chunk, (n, lines) in zip(chunks, counted, strict=True):
        firsts.append(rows)
        chunk["first_line"] = 1 + lines_before.get(chunk["uri"], 0)
        rows += n
        lines_before[chunk["uri"]] = lines_before.get(chunk["uri"], 0) + lines
    return firsts
