"""The input side of `clap preprocess` (and `clap embed` / `clap evaluate` on raw corpora): the corpus
layouts users already have, read into one row format (clap_core.data.input_rows.InputRow).

    rows = read_inputs("corpus/manifest.jsonl")        # or .csv, an AudioCaps/Clotho CSV, a folder, a .tar
    rows[0] == {"id": "clip-1", "audio_uri": "/abs/corpus/audio/clip-1.flac", "source_path": "audio/clip-1.flac",
                "byte_offset": None, "byte_size": None, "caption": "a dog barks", "captions": ["a dog barks"],
                "language": "en", "label": None, "split": None, "kind": None, "row_index": 0, "error": None}

Supported inputs (picked by `read_inputs` from the path and the CSV header):
    JSONL / CSV manifest  (or a folder of .jsonl parts, read in name order)     clap_core.data.input_tables
    AudioCaps / Clotho CSV                                                      clap_core.data.input_tables
    sidecar folder        audio files with <stem>.txt or <stem>.json            clap_core.data.input_folders
    WebDataset tars       LAION-CLAP style <key>.flac + <key>.json              clap_core.data.input_folders

Every input line or clip becomes exactly one row, in input order (`row_index`). Text is decoded as
UTF-8 (or `encoding`) with surrogateescape, so a caption with bytes invalid in that encoding stays
visible as such and is rejected later as `caption_not_utf8` instead of killing the read or being
silently mangled. A row that cannot even be parsed carries `error` = (reason, detail) and is rejected
at stage read_manifest. Nothing here checks audio files beyond finding them: decoding is per worker.
"""
from __future__ import annotations

from typing import NamedTuple

from clap_core import storage
from clap_core.data.input_folders import read_sidecar_folder, read_webdataset
from clap_core.data.input_rows import AUDIO_SUFFIXES, InputRow
from clap_core.data.input_tables import read_csv, read_jsonl


class ResolvedInput(NamedTuple):
    """What an input is, found once per job and handed to what reads, counts or fingerprints it."""
    kind: str  # "jsonl" (a manifest, or a folder of .jsonl parts), "csv", "tar" (a .tar or a folder of them), "sidecar"
    files: list[str]  # the manifest files or tars, in read order; [the folder] for a sidecar folder
    listing: list[storage.FileStat] | None  # every file below a folder input, from one listing; None for a file


def resolve_input(path: str) -> ResolvedInput:
    """The kind and files of an input (see ResolvedInput). A folder is listed here, once: on object storage a
    listing of 8M clips is ~8,000 requests, so the fingerprint, the size test and the cut into chunks reuse it."""
    path = str(path)
    uri = path if storage.is_s3(path) else storage.resolve_fs(path)[1]
    lower = uri.lower()
    if lower.endswith((".jsonl", ".json")):
        return ResolvedInput("jsonl", [uri], None)
    if lower.endswith(".csv"):
        return ResolvedInput("csv", [uri], None)
    if lower.endswith(".tar"):
        return ResolvedInput("tar", [uri], None)
    if not storage.is_s3(uri) and not storage.is_dir(uri):  # a prefix is listed below: no request for it here
        raise FileNotFoundError(f"input not found or of unknown kind: {path}")
    listing = storage.list_file_stats(uri)
    files = [stat.uri for stat in listing]
    tars = [f for f in files if f.lower().endswith(".tar")]
    if tars:
        return ResolvedInput("tar", tars, listing)
    parts = [f for f in files if f.lower().endswith(".jsonl")]
    if parts and not any(f.lower().endswith(AUDIO_SUFFIXES) for f in files):
        return ResolvedInput("jsonl", parts, listing)
    return ResolvedInput("sidecar", [uri], listing)


def read_inputs(path: str, encoding: str = "utf-8", audio_dir: str | None = None,
                resolved: ResolvedInput | None = None) -> list[InputRow]:
    """Rows of any supported input (see the module docstring), in input order; `resolved`: resolve_input(path)
    when the caller has it (a folder is then not listed again)."""
    kind, files, listing = resolved or resolve_input(path)
    if kind == "jsonl":
        rows = []
        for uri in files:
            rows += read_jsonl(uri, encoding, len(rows))
        return rows
    if kind == "csv":
        return read_csv(files[0], encoding, audio_dir)
    if kind == "tar":
        return read_webdataset(files, encoding)
    return read_sidecar_folder(files[0], encoding, listing)
