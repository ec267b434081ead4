"""Unit markers of `clap preprocess`: OUT/_done/<unit>.json, the commit point of one work unit.

A unit writes its shards and its rejects file first, then its marker; a unit with a marker is done, one
without is redone from scratch on the next run (clap_core.data.shards.clean_uncommitted removes what it
left). The marker lists the files the unit committed and its counts; manifest.json is built from the
markers only (clap_core.data.shards.build_index). This module is the one writer and reader of markers:

    write_marker(out_uri, marker)                 # after the unit's shards and rejects are committed
    markers = read_markers(out_uri)               # {unit key: Marker} of every committed unit
    check_markers({key: hash, ...}, markers, out_uri)   # ValueError when they belong to another job

On disk a marker is `json.dumps(marker.to_dict(), sort_keys=True)`, byte for byte what earlier versions
wrote, so an output started by one version resumes under the next.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TypedDict

from clap_core import storage

DONE_DIR = "_done"  # OUT/_done/<unit key>.json


class ShardEntry(TypedDict):
    """One committed shard file, as a marker and manifest.json list it."""

    path: str  # relative to the output folder: "<split>/part-<n>-<k>.parquet"
    split: str
    rows: int
    bytes: int  # file size
    seconds: float  # audio seconds of its rows (augmented copies included)


@dataclass
class UnitRejects:
    """The reject rows a unit committed (one file, or none)."""

    path: str | None  # "_rejects/part-<split>-<n>.parquet", None when the unit rejected nothing
    rows: int  # rejected input rows
    by_reason: dict[str, int]  # reason -> input rows
    segments: int = 0  # dropped segments of long clips whose row has output (not input rows)
    segments_by_reason: dict[str, int] = field(default_factory=dict)  # reason -> dropped segments

    def to_dict(self) -> dict:
        return {"path": self.path, "rows": self.rows, "by_reason": self.by_reason, "segments": self.segments,
                "segments_by_reason": self.segments_by_reason}

    @classmethod
    def from_dict(cls, d: dict) -> UnitRejects:
        # markers written before segment accounting have no "segments" keys
        return cls(path=d["path"], rows=d["rows"], by_reason=dict(d["by_reason"]), segments=d.get("segments", 0),
                   segments_by_reason=dict(d.get("segments_by_reason", {})))


@dataclass
class Marker:
    """What one committed unit wrote and counted."""

    unit: str  # unit key "<split>-<n:05d>"
    hash: str  # the unit's content hash (its rows and the job config): another hash means another job
    split: str
    rows_in: int  # input rows of the unit
    sources_out: int  # input rows with at least one output row
    rows_out: int  # output rows (clips, segments, augmented copies)
    seconds_in: float  # audio seconds of the input rows that produced output (copies not counted)
    seconds_out: float  # audio seconds of all output rows
    cpu_seconds: float  # CPU time of the process that ran the unit (benchmarks, cost)
    shards: list[ShardEntry]  # in write order
    rejects: UnitRejects

    def committed_files(self) -> list[str]:
        """Paths (relative to the output folder) of every file the unit committed before its marker."""
        return [s["path"] for s in self.shards] + ([self.rejects.path] if self.rejects.path else [])

    def to_dict(self) -> dict:
        return {"unit": self.unit, "hash": self.hash, "split": self.split, "rows_in": self.rows_in,
                "sources_out": self.sources_out, "rows_out": self.rows_out, "seconds_in": self.seconds_in,
                "seconds_out": self.seconds_out, "cpu_seconds": self.cpu_seconds,
                "shards": [dict(s) for s in self.shards], "rejects": self.rejects.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Marker:
        return cls(unit=d["unit"], hash=d["hash"], split=d["split"], rows_in=d["rows_in"],
                   sources_out=d["sources_out"], rows_out=d["rows_out"], seconds_in=d["seconds_in"],
                   seconds_out=d["seconds_out"], cpu_seconds=d["cpu_seconds"],
                   shards=[ShardEntry(**s) for s in d["shards"]], rejects=UnitRejects.from_dict(d["rejects"]))

    def to_json(self) -> bytes:
        """The marker file's bytes (sorted keys, no indent: unchanged since the first version)."""
        return json.dumps(self.to_dict(), sort_keys=True).encode()


def marker_uri(out_uri: str, unit_key: str) -> str:
    return storage.join(out_uri, DONE_DIR, f"{unit_key}.json")


def write_marker(out_uri: str, marker: Marker) -> None:
    """Commit a unit (atomic: temp file + rename locally, one PUT on S3)."""
    storage.put_atomic(marker_uri(out_uri, marker.unit), marker.to_json())


def read_markers(out_uri: str) -> dict[str, Marker]:
    """unit key -> marker, for every committed unit under out_uri (temp files of a crashed write skipped)."""
    markers = {}
    for uri in storage.list_files(storage.join(out_uri, DONE_DIR)):
        name = uri.rsplit("/", 1)[-1]
        if name.endswith(".json") and not name.startswith(storage.TEMP_PREFIX):
            marker = Marker.from_dict(json.loads(storage.read_bytes(uri)))
            markers[marker.unit] = marker
    return markers


def check_markers(planned: dict[str, str], markers: dict[str, Marker], out_uri: str) -> None:
    """planned: unit key -> unit hash of this job. A marker of another job (other input or config, so other
    hashes or units) means this output is not ours to resume: ValueError."""
    foreign = sorted(k for k, m in markers.items() if planned.get(k) != m.hash)
    if foreign:
        raise ValueError(f"{out_uri} holds units of a different job (input or config changed), e.g. {foreign[0]}; "
                         "use a new --output or delete the old one")
