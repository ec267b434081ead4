"""Input readers for folders and archives: audio files with sidecar captions, and WebDataset tars.
Every clip becomes one `clap_core.data.input_rows.InputRow`, in a stable order.

    sidecar folder        audio files with <stem>.txt (one caption a line) or <stem>.json next to them
    WebDataset tars       LAION-CLAP style <key>.flac + <key>.json ({"text": str | [str], ...}); a .tar
                          or a folder of them; audio is read later as a byte range of the tar

An entry that cannot be used (no caption, a FIFO named like audio, a damaged tar) is a row with `error`
set, never an exception: it is rejected at stage read_manifest. Nothing here opens audio.
"""
from __future__ import annotations

import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from clap_core import storage
from clap_core.audio.codec import AudioDecodeError, check_local_file
from clap_core.data.input_rows import AUDIO_SUFFIXES, ROW_FIELDS, InputRow, as_text, decode_text, new_row, parse_json

MAX_METADATA_BYTES = 16 << 20  # a .json member or sidecar larger than this is not read (bad_manifest_row)


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


def folder_entries(root: str, listing: list[storage.FileStat] | None = None) -> list[tuple[str, tuple[str, str] | None]]:
    """(path, problem) for every entry below a folder, sorted; problem = (reason, detail) for an audio-named
    entry that is not a regular file (is_directory, fifo, device, symlink_loop, ...). Local folders are
    walked without following symlinked folders (a loop can never list a clip twice); nothing is opened.
    An object store holds only objects: its `listing` (storage.list_file_stats, from resolve_input) is used
    as it is when given, else the prefix is listed here."""
    if storage.is_s3(root):
        return [(stat.uri, None) for stat in (storage.list_file_stats(root) if listing is None else listing)]
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


SIDECAR_READERS = 16  # sidecars read at once: on object storage each is a request (~20 ms), one after another
#                      8M clips would take ~2 days; they are small, so threads wait on the network, not the CPU
SIDECAR_CHUNK_CLIPS = 20_000  # audio files of a folder one task reads the sidecars of (~25 s of requests on S3)

Entry = tuple[str, tuple[str, str] | None]  # (path, problem): folder_entries' items


def sidecar_audio(entries: list[Entry]) -> list[Entry]:
    """(path, problem) of a folder's audio entries, in row order: one row each."""
    return [(f, problem) for f, problem in entries if f.lower().endswith(AUDIO_SUFFIXES)]


def sidecars_by_stem(entries: list[Entry]) -> dict[str, Entry]:
    """{path less its suffix: (sidecar path, problem)} of the .txt / .json entries."""
    return {f.rsplit(".", 1)[0]: (f, problem) for f, problem in entries if f.lower().endswith((".txt", ".json"))}


def read_sidecar_folder(uri: str, encoding: str = "utf-8",
                        listing: list[storage.FileStat] | None = None) -> list[InputRow]:
    """Each audio file is a row, id = its path relative to the folder without the suffix; the sidecars are read
    SIDECAR_READERS at a time, the rows in listing order (`listing`: see folder_entries)."""
    root = uri.rstrip("/")
    entries = folder_entries(root, listing)
    return sidecar_rows(root, sidecar_audio(entries), sidecars_by_stem(entries), 0, encoding)


def sidecar_chunks(uri: str, clips_per_chunk: int | None = None,
                   listing: list[storage.FileStat] | None = None) -> list[dict]:
    """A sidecar folder's listing (`listing`: see folder_entries) cut into JSON-able chunks of at most
    clips_per_chunk audio files, each with the sidecars of its own stems, so that tasks read the rows of a chunk
    each (sidecar_chunk_rows) without listing the folder again; the chunks in order hold read_sidecar_folder's
    rows. Paths are kept relative to the folder."""
    root, step = uri.rstrip("/"), clips_per_chunk or SIDECAR_CHUNK_CLIPS
    entries = folder_entries(root, listing)
    audio, by_stem = sidecar_audio(entries), sidecars_by_stem(entries)
    cut = len(root) + 1
    chunks = []
    for start in range(0, max(len(audio), 1), step):
        part = audio[start:start + step]
        stems = [f.rsplit(".", 1)[0] for f, _ in part]
        chunks.append({"kind": "sidecar", "uri": root, "audio": [[f[cut:], problem] for f, problem in part],
                       "sidecars": {stem[cut:]: [by_stem[stem][0][cut:], by_stem[stem][1]]
                                    for stem in stems if stem in by_stem}})
    return chunks


def sidecar_chunk_rows(chunk: dict, first_index: int, encoding: str = "utf-8") -> list[InputRow]:
    """The rows of one of sidecar_chunks' chunks, numbered from first_index."""
    root = chunk["uri"]

    def entry(rel: str, problem: list | None) -> Entry:
        return f"{root}/{rel}", tuple(problem) if problem else None
    audio = [entry(rel, problem) for rel, problem in chunk["audio"]]
    by_stem = {f"{root}/{stem}": entry(*sidecar) for stem, sidecar in chunk["sidecars"].items()}
    return sidecar_rows(root, audio, by_stem, first_index, encoding)


def sidecar_rows(root: str, audio: list[Entry], by_stem: dict[str, Entry], first_index: int,
                 encoding: str) -> list[InputRow]:
    """Rows of audio entries (numbered from first_index) with their sidecars, read SIDECAR_READERS at a time."""

    def row(index: int, path: str, problem: tuple[str, str] | None) -> InputRow:
        rel = path[len(root) + 1:]
        clip_id = rel.rsplit(".", 1)[0]
        if problem is not None:  # a folder, FIFO, device or loop named like audio: never opened
            return new_row(index, rel, path, [], id=clip_id, error=problem)
        sidecar, sidecar_problem = by_stem.get(path.rsplit(".", 1)[0], (None, None))
        if sidecar is None:
            return new_row(index, rel, path, [], id=clip_id, error=("missing_caption", "no .txt/.json sidecar"))
        if sidecar_problem is not None:
            return new_row(index, rel, path, [], id=clip_id, error=("bad_sidecar", f"{sidecar}: {sidecar_problem[1]}"))
        try:
            if not storage.is_s3(sidecar) and os.path.getsize(sidecar) > MAX_METADATA_BYTES:
                raise ValueError(f"larger than {MAX_METADATA_BYTES} bytes: not read")
            captions, fields = sidecar_fields(storage.read_bytes(sidecar), "." + sidecar.rsplit(".", 1)[1].lower(),
                                              encoding)
        except ValueError as e:
            return new_row(index, rel, path, [], id=clip_id, error=("bad_manifest_row", f"{sidecar}: {e}"))
        fields["id"] = fields.get("id") or clip_id
        return new_row(index, rel, path, captions, **fields)

    if len(audio) < 2:
        return [row(first_index + i, path, problem) for i, (path, problem) in enumerate(audio)]
    rows = []
    with ThreadPoolExecutor(max_workers=min(SIDECAR_READERS, len(audio)), thread_name_prefix="sidecars") as pool:
        for start in range(0, len(audio), 64 * SIDECAR_READERS):  # futures for a window at a time, not per clip
            window = audio[start:start + 64 * SIDECAR_READERS]
            rows += pool.map(row, range(first_index + start, first_index + start + len(window)), *zip(*window))
    return rows


# -------------------------------------------------------------------------------------------------
# WebDataset tar shards (LAION-CLAP layout)




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


def webdataset_rows(uri: str, first_index: int, encoding: str) -> list[InputRow]:
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


def read_webdataset(uris: list[str], encoding: str = "utf-8") -> list[InputRow]:
    rows = []
    for uri in uris:
        rows += webdataset_rows(uri, len(rows), encoding)
    return rows
