"""Exactly once at scale: a 100,000-row manifest (4 real clips, the rest missing files, 1 in 1000 a
duplicate id) is planned in parallel tasks, crashed after 3 committed units, left with the debris of
units that committed shards but no marker, and resumed. Every input row must end in exactly one place,
the real clips must carry the same bytes as an in-memory run, and neither the resume nor the re-run
of the finished job may read the input again (the plan comes back from its marker)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

import pipelines.preprocess_plan as plan_module
from clap_core import storage
from clap_core.data.inputs import read_inputs
from clap_core.data.shards import committed_rejects, read_shards
from clap_core.preprocess.config import load_preprocess_config
from clap_core.preprocess.plan import plan_units
from clap_core.preprocess.unit import process_row
from clap_demo.synth import write_scale_manifest
from pipelines.preprocess import SimulatedCrash, preprocess
from tests.integration.test_preprocess import settled_markers

pytestmark = pytest.mark.integration
ROWS = 100_000
SCALE = ["ray.concurrency=2", "output.rows_per_unit=4000", "ray.plan_chunk_mb=1", "input.plan_group_rows=40000"]


def test_100k_rows_crash_and_resume_exactly_once(ray_local, tmp_path, monkeypatch):
    manifest = write_scale_manifest(tmp_path / "in", ROWS, n_real=4, seed=5, duplicate_every=1000)
    out = str(tmp_path / "out")
    with pytest.raises(SimulatedCrash):
        preprocess(str(manifest), out, load_preprocess_config(None, [*SCALE, "debug.crash_after_units=3"]))
    done = settled_markers(f"{out}/_done")
    for marker in done[3:]:  # their shards and rejects become the debris of a crash before the marker
        storage.delete(marker)
    (plan_file,) = [f for f in storage.list_files(f"{out}/_plan") if f.endswith("/plan.json")]

    def no_reading(*args, **kwargs):
        raise AssertionError("the input was read again although its plan was committed")

    monkeypatch.setattr(plan_module.chunking, "input_chunks", no_reading)
    cfg = load_preprocess_config(None, SCALE)
    result = preprocess(str(manifest), out, cfg)
    assert result["run"]["units_processed"] == result["units"] - 3 and result["units"] >= 25
    assert not [f for f in storage.list_files(f"{out}/_plan") if f.endswith(".parquet")]  # staging dropped

    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    shards = read_shards(out).to_pylist()
    rejects = committed_rejects(out).to_pylist()
    assert Counter(r["id"] for r in lines) == Counter([r["source_id"] for r in shards] + [r["id"] for r in rejects])
    assert Counter(r["reason"] for r in rejects) == {"missing_file": ROWS - 4 - 99, "duplicate_id": 99}
    assert result["rows_in"] == ROWS == result["sources_out"] + result["rejects"]["rows"]

    real = [r for u in plan_units(read_inputs(str(manifest))[:4], cfg).units for r in u.rows]
    expected = {row["id"]: row["audio"] for r in real for row in process_row(r, cfg)[0]}
    assert {r["id"]: r["audio"] for r in shards} == expected and len(expected) == 4

    again = preprocess(str(manifest), out, cfg)  # finished: plan.json and manifest.json only
    assert again["run"]["units_processed"] == 0 and again["job_hash"] == result["job_hash"]
    assert storage.exists(plan_file)
