"""The records that cross stages and versions: unit markers read and written byte for byte as earlier
versions did (resume across versions), units through JSON (Ray Data, plan.json), the index from markers."""
from __future__ import annotations

import json

import pytest

from clap_core import storage
from clap_core.data.markers import Marker, check_markers, marker_uri, read_markers, write_marker
from clap_core.data.shards import REJECTS_DIR, build_index, clean_uncommitted, unit_files, unit_key
from clap_core.preprocess.plan import Plan, Unit

# A marker as the version before the typed record wrote it (json.dumps(dict, sort_keys=True)).
OLD_MARKER = (b'{"cpu_seconds": 0.25, "hash": "051e4e162f39b00b", "rejects": {"by_reason": {"missing_file": 1}, '
              b'"path": "_rejects/part-valid-00000.parquet", "rows": 1, "segments": 2, "segments_by_reason": '
              b'{"silent_segment": 2}}, "rows_in": 3, "rows_out": 2, "seconds_in": 1.919, "seconds_out": 1.919, '
              b'"shards": [{"bytes": 65233, "path": "valid/part-00000-000.parquet", "rows": 1, "seconds": 0.769, '
              b'"split": "valid"}, {"bytes": 22345, "path": "valid/part-00000-001.parquet", "rows": 1, "seconds": '
              b'1.15, "split": "valid"}], "sources_out": 2, "split": "valid", "unit": "valid-00000"}')


def test_a_marker_of_the_earlier_version_reads_and_writes_back_byte_identical(tmp_path):
    out = str(tmp_path)
    storage.put_atomic(marker_uri(out, "valid-00000"), OLD_MARKER)
    marker = read_markers(out)["valid-00000"]
    assert marker.rows_out == 2 and marker.rejects.by_reason == {"missing_file": 1} and marker.rejects.segments == 2
    assert marker.committed_files() == ["valid/part-00000-000.parquet", "valid/part-00000-001.parquet",
                                        "_rejects/part-valid-00000.parquet"]
    assert marker.to_json() == OLD_MARKER
    write_marker(str(tmp_path / "again"), marker)
    assert (tmp_path / "again" / "_done" / "valid-00000.json").read_bytes() == OLD_MARKER


def test_a_marker_from_before_segment_accounting_reads_with_zero_segments(tmp_path):
    doc = json.loads(OLD_MARKER)
    for key in ("segments", "segments_by_reason"):
        del doc["rejects"][key]
    marker = Marker.from_dict(doc)
    assert marker.rejects.segments == 0 and marker.rejects.segments_by_reason == {}
    index = build_index([marker], input_uri="in", job_hash="j", rows_in=3, config={}, config_hash="c")
    assert index["rejects"] == {"rows": 1, "by_reason": {"missing_file": 1}, "segments": 0, "segments_by_reason": {},
                                "files": ["_rejects/part-valid-00000.parquet"]}
    assert index["splits"] == {"valid": {"rows": 2, "hours": pytest.approx(1.919 / 3600), "shards": 2}}


def test_markers_of_another_job_are_refused(tmp_path):
    out = str(tmp_path)
    storage.put_atomic(marker_uri(out, "valid-00000"), OLD_MARKER)
    check_markers({"valid-00000": "051e4e162f39b00b", "valid-00001": "x"}, read_markers(out), out)  # ours
    with pytest.raises(ValueError, match="different job"):
        check_markers({"valid-00000": "another"}, read_markers(out), out)
    with pytest.raises(ValueError, match="different job"):
        check_markers({}, read_markers(out), out)  # a unit this plan does not have


def test_clean_uncommitted_deletes_only_unlisted_files_of_the_layout(tmp_path):
    out = str(tmp_path)
    marker = Marker.from_dict(json.loads(OLD_MARKER))
    kept = [storage.join(out, p) for p in marker.committed_files()]
    debris = [storage.join(out, "valid", "part-00001-000.parquet"), storage.join(out, REJECTS_DIR, "part-valid-00001.parquet")]
    foreign = [storage.join(out, "notes", "part-0.parquet"), storage.join(out, "valid", "README.txt")]
    for uri in kept + debris + foreign:
        storage.put_atomic(uri, b"x")
    assert sorted(clean_uncommitted(out, ["valid"], {marker.unit: marker})) == sorted(debris)
    assert all(storage.exists(u) for u in kept + foreign) and not any(storage.exists(u) for u in debris)


def test_unit_crosses_json_without_its_rows_and_names_its_files(tmp_path):
    unit = Unit(key=unit_key("train", 3), split="train", index=3, hash="h", pieces=["p0", "p1"], size=7,
                rows=[{"id": "a"}])
    wire = json.loads(json.dumps(unit.to_dict()))
    assert list(wire) == ["key", "split", "index", "pieces", "size", "hash"] and "rows" not in wire
    back = Unit.from_dict(wire)
    assert back.rows is None and back == Unit(**{**unit.__dict__, "rows": None})
    plan = Plan(units=[unit], rows_in=7, planned_rejects=1, job_hash="j")
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).units == [back]
    files = unit_files("s3://b/out", unit.split, unit.index)
    assert (files.shard_prefix, files.rejects, files.marker) == (
        "s3://b/out/train/part-00003-", "s3://b/out/_rejects/part-train-00003.parquet", "s3://b/out/_done/train-00003.json")
