"""What `clap embed` reads: rows of id, the audio (shard bytes, or where to read it) and the input's metadata, for
either runner (the Ray job: `ray_dataset`; the in-process one: `local_rows`). No Ray import at module level: the
in-process runner never imports Ray.

- A shard folder (`clap preprocess` output, or Parquet with SHARD_COLUMNS): Ray Data reads its Parquet; the
  in-process runner streams it (clap_core.data.shards.iter_shard_rows).
- A manifest (anything clap_core.data.inputs reads) of at most IN_DRIVER_MANIFEST_BYTES (a folder of audio with
  caption sidecars: of at most SIDECAR_CHUNK_CLIPS audio files): read here, into items
  (`manifest_item`), every later row of an id seen before a duplicate_id reject (embedded once, the first
  occurrence).
- A bigger manifest is never held by one process (1M JSONL rows are ~1.9 GB of items in Python): it is cut into
  chunks (clap_core.data.input_chunks) that Ray tasks read. (0) Each chunk's rows are counted, so rows are
  numbered as a whole read numbers them (an id derived from a position, a reject's line number). (1) A group-by on
  id over the chunks finds the ids of more than one row and where each first occurs: the driver holds only
  those. (2) The chunks are read again into items, later rows of a repeated id marked duplicate_id, and stream
  into the decode stage. The in-process runner reads the chunks one after another, keeping the ids seen.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from clap_core import storage
from clap_core.data import input_folders, shards
from clap_core.data.input_chunks import chunk_starts, count_lines, input_chunks, read_chunk
from clap_core.data.input_rows import AUDIO_SUFFIXES, row_id
from clap_core.data.inputs import ResolvedInput, read_inputs, resolve_input
from clap_core.data.rejects import Reject, reject
from clap_core.io_faults import retry_transient

META_COLUMNS = ("caption", "label", "split", "source_path", "language", "kind")
SHARD_COLUMNS = ("id", "audio") + META_COLUMNS  # what the job reads of a shard
IN_DRIVER_MANIFEST_BYTES = 16 << 20  # a manifest up to this size is read by the driver (~80K JSONL rows, ~150 MB
#                                      of items); a bigger one by Ray tasks, a chunk each
CHUNK_MB = 16.0  # JSONL or CSV a read task turns into items at once (~150 MB of them)
DUPLICATE = "duplicate_id"


class EmbedInput(NamedTuple):
    """What `clap embed` reads, looked at once in the driver (open_input): the runners take it as it is."""
    uri: str
    split: str | None
    shards: bool  # a shard folder: Parquet read as such
    resolved: ResolvedInput | None  # a manifest's kind, files and folder listing (reused, never listed again)
    items: list[dict] | None  # a manifest read here; None: a shard folder or a big manifest, streamed
    duplicates: list[Reject]  # a duplicate_id reject for every later row of an id among `items`


def open_input(input_uri: str, split: str | None) -> EmbedInput:
    """The input looked at once: a folder is listed once (resolve_input) for whether it holds shards, how big it
    is and, when it is small enough (is_big_manifest), its items read here."""
    resolved = None if shards.has_index(input_uri) else resolve_input(input_uri)
    if resolved is None or shards.is_shard_folder(input_uri, resolved.listing):
        return EmbedInput(input_uri, split, True, None, None, [])
    if is_big_manifest(input_uri, resolved):
        return EmbedInput(input_uri, split, False, resolved, None, [])
    items, duplicates = unique_items([manifest_item(r) for r in read_inputs(input_uri, resolved=resolved)
                                      if in_split(r, split)])
    return EmbedInput(input_uri, split, False, resolved, items, duplicates)


def is_big_manifest(input_uri: str, resolved: ResolvedInput | None = None) -> bool:
    """Whether the manifest's files pass IN_DRIVER_MANIFEST_BYTES (sizes asked until they do); a folder of audio
    with caption sidecars, whether it holds more audio files than a chunk of it (SIDECAR_CHUNK_CLIPS): each of
    its rows costs a sidecar read, which tasks share. `resolved`: resolve_input(input_uri) if the caller has it."""
    kind, files, listing = resolved or resolve_input(input_uri)
    if kind == "sidecar":  # counted in the folder's listing
        audio = (1 for stat in listing if stat.uri.lower().endswith(AUDIO_SUFFIXES))
        return total_within(audio, input_folders.SIDECAR_CHUNK_CLIPS) is None
    listed = {stat.uri: stat.size for stat in listing or ()}  # a folder of manifest parts: sizes from its listing
    sizes = (listed[uri] if uri in listed else storage.file_size(uri) for uri in files)
    return total_within(sizes, IN_DRIVER_MANIFEST_BYTES) is None


def total_within(counts: Iterable[int], limit: int) -> int | None:
    """The sum of `counts`, or None once it passes `limit` (the counts after that are never asked for: each may
    be a request to object storage)."""
    total = 0
    for count in counts:
        total += count
        if total > limit:
            return None
    return total


def in_split(row: dict, split: str | None) -> bool:
    return not split or row.get("split") in (None, "", split)


def unique_items(items: list[dict]) -> tuple[list[dict], list[Reject]]:
    """(items with unique ids, a duplicate_id reject record for every later row of an id seen before)."""
    unique, duplicates = [], []
    for item in mark_repeats(items):
        if item["error_reason"] == DUPLICATE:
            duplicates.append(reject(item, "read_manifest", DUPLICATE, item["error_detail"]))
        else:
            unique.append(item)
    return unique, duplicates


def mark_repeats(items: Iterable[dict]) -> Iterator[dict]:
    """The items, every later row of an id seen before marked duplicate_id (as_duplicate); holds the ids seen."""
    seen: set[str] = set()
    for item in items:
        yield as_duplicate(item) if item["id"] in seen else item
        seen.add(item["id"])


def duplicate_detail(item_id: str) -> str:
    return f"id {item_id!r} appeared earlier in the input: embedded once"


def manifest_item(row: dict) -> dict:
    """A manifest row as flat strings for Ray Data (where to read the audio, what to carry along)."""
    item = {k: _text(row.get(k)) for k in META_COLUMNS}
    error = row.get("error")
    ranged = row.get("byte_offset") is not None
    item.update(id=row_id(row), audio_uri=_text(row.get("audio_uri")),
                byte_offset=row["byte_offset"] if ranged else -1, byte_size=row["byte_size"] if ranged else -1,
                error_reason=error[0] if error else "", error_detail=error[1] if error else "")
    return item


def _text(value) -> str:
    return "" if value is None else str(value)


def as_duplicate(item: dict) -> dict:
    """A later row of a repeated id: an item the decode stage turns into its duplicate_id reject."""
    return {**item, "error_reason": DUPLICATE, "error_detail": duplicate_detail(item["id"])}


# --- a big manifest, a chunk at a time ---


def counted_chunks(source: EmbedInput, count) -> list[dict]:
    """The manifest's chunks, each with "first" (its first row's index in the input) and "first_line"; `count`
    maps the chunks to their (rows, lines), in tasks or here."""
    chunks = input_chunks(source.uri, CHUNK_MB, resolved=source.resolved)
    firsts = chunk_starts(chunks, count(chunks))
    return [{**chunk, "first": first} for chunk, first in zip(chunks, firsts, strict=True)]


def chunk_items(chunk: dict, split: str | None) -> Iterator[tuple[int, dict]]:
    """(row index, item) of one counted chunk's rows of `split`; a transient storage error reads the chunk again
    (a verdict on the network, never on the rows)."""
    for row in retry_transient(lambda: read_chunk(chunk, chunk["first"]), what=chunk_name(chunk)):
        if in_split(row, split):
            yield row["row_index"], manifest_item(row)


def chunk_name(chunk: dict) -> str:
    if "start" in chunk:
        return f"{chunk['uri']} bytes {chunk['start']}-{chunk['end']}"
    if chunk.get("audio"):  # a part of a sidecar folder
        return f"{chunk['uri']} files {chunk['audio'][0][0]} to {chunk['audio'][-1][0]}"
    return chunk["uri"]


def count_chunk(chunk: dict) -> tuple[int, int]:
    """(rows, lines) of a chunk, read again after a transient storage error."""
    return retry_transient(lambda: count_lines(chunk), what=chunk_name(chunk))


def local_rows(source: EmbedInput) -> Iterator[dict]:
    """The input's rows for the in-process runner: the items read here, a shard folder's rows streamed, or a big
    manifest's items a chunk at a time (duplicates marked as the Ray job marks them; the ids seen are held)."""
    if source.items is not None:
        yield from source.items
    elif source.shards:
        yield from shards.iter_shard_rows(source.uri, source.split, list(SHARD_COLUMNS))
    else:
        chunks = counted_chunks(source, lambda chunks: [count_chunk(c) for c in chunks])
        yield from mark_repeats(item for chunk in chunks for _, item in chunk_items(chunk, source.split))


def ray_dataset(ray, source: EmbedInput, num_cpus: float = 1):
    """A Ray Dataset of the input's rows (the items read here, a shard folder's Parquet, or a big manifest read by
    tasks, a chunk each: the module docstring's stages 0-2)."""
    from pipelines.ray_shards import read_shards

    split = source.split
    if source.items is not None:
        return ray.data.from_items(source.items)
    if source.shards:
        return read_shards(shards.shard_files(source.uri, split), list(SHARD_COLUMNS))
    from ray.data.aggregate import Count, Min

    from pipelines.preprocess_plan import count_chunks

    chunks = counted_chunks(source, lambda chunks: count_chunks(chunks, num_cpus))  # (0), transient errors retried
    source = ray.data.from_items([{"chunk": json.dumps(c)} for c in chunks], override_num_blocks=max(1, len(chunks)))

    def ids(row: dict) -> list[dict]:
        return [{"id": item["id"], "row": index} for index, item in chunk_items(json.loads(row["chunk"]), split)]

    repeated = (source.flat_map(ids, num_cpus=num_cpus).groupby("id")
                .aggregate(Count(alias_name="rows"), Min("row", alias_name="first"))
                .filter(expr="rows > 1").take_all())  # (1) only the ids of more than one row
    first_row = {r["id"]: r["first"] for r in repeated}

    def chunk_rows(row: dict) -> list[dict]:  # (2) one chunk's items, later rows of a repeated id marked
        return [as_duplicate(item) if first_row.get(item["id"], index) != index else item
                for index, item in chunk_items(json.loads(row["chunk"]), split)]

    return source.flat_map(chunk_rows, num_cpus=num_cpus)
