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

from clap_core import storage
from clap_core.data.input_folders import read_sidecar_folder, read_webdataset
from clap_core.data.input_rows import AUDIO_SUFFIXES, InputRow
from clap_core.data.input_tables import read_csv, read_jsonl


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


def read_inputs(path: str, encoding: str = "utf-8", audio_dir: str | None = None) -> list[InputRow]:
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
