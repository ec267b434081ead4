"""The planned row: what the planner makes of an input row (clap_core.data.input_rows.InputRow) and
hands to a worker inside a unit. Rows stay plain dicts on the hot path (millions of them); their
fields are listed here once.

    row, problem = check_row(input_row, cfg)      # normalised row, (reason, detail) or None
"""
from __future__ import annotations

import re
from typing import TypedDict

from clap_core.data.input_rows import InputRow, row_id
from clap_core.data.rejects import printable
from clap_core.preprocess.config import PreprocessConfig

SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # splits become folder names


class PlannedReject(TypedDict):
    stage: str  # "read_manifest": rejected while planning, before any audio is read
    reason: str  # machine-readable, e.g. "duplicate_id", "empty_caption"
    detail: str


class EnvPartner(TypedDict):
    """The env clip mixed into one augmented copy of a speech row (enough to read its audio)."""

    id: str
    audio_uri: str
    byte_offset: int | None
    byte_size: int | None
    source_path: str
    caption: str


class PlannedRow(TypedDict):
    """An InputRow after planning (check_row, clap_core.preprocess.plan): "error" is gone, these are set."""

    id: str  # escaped input id, or derived from the audio path (clap_core.data.input_rows.row_id)
    audio_uri: str | None
    source_path: str
    byte_offset: int | None
    byte_size: int | None
    caption: str  # main caption, stripped
    captions: list[str]  # main first, empty extra captions dropped
    language: str | None
    label: str | None
    split: str  # the row's split, or input.default_split
    kind: str | None  # "speech", "env" or None
    row_index: int
    planned_reject: PlannedReject | None  # set: the row becomes one reject row, no audio is read
    env_partners: dict[str, EnvPartner]  # augmented copy k (as a string: JSON keys) -> env partner


def text_ok(text: str) -> bool:
    """False when text carries undecodable bytes (surrogateescape) that Arrow could not store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_row(row: InputRow, cfg: PreprocessConfig) -> tuple[dict, tuple[str, str] | None]:
    """Normalise one input row; returns (row, (reason, detail) or None when usable)."""
    row = dict(row)
    row["id"] = row_id(row)
    row["split"] = row.get("split") or cfg.input.default_split
    kind = (row.get("kind") or "").strip().lower()
    row["kind"] = kind if kind in ("speech", "env") else None
    captions = [c.strip() for c in row.get("captions") or [] if c is not None]
    row["caption"] = captions[0] if captions else ""
    row["captions"] = [captions[0]] + [c for c in captions[1:] if c] if captions else []
    if not SPLIT_NAME.match(row["split"]) and not row.get("error"):
        row["error"] = ("bad_split", f"split {printable(row['split'])!r} is not a folder name")
    if row.get("error"):
        row["split"] = row["split"] if SPLIT_NAME.match(row["split"]) else cfg.input.default_split
        return row, tuple(row["error"])
    if not text_ok(row["id"]) or not text_ok(row["source_path"]):
        return row, ("path_or_id_not_utf8", "id or audio path holds bytes that are not valid text")
    if not all(text_ok(c) for c in row["captions"]):
        return row, ("caption_not_utf8", f"caption bytes are not valid {cfg.input.encoding}: {printable(row['caption'])}")
    if not row["caption"]:
        return row, ("empty_caption", "main caption is empty")
    return row, None
