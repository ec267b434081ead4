"""The real `clap preprocess` command in a subprocess (its own local Ray): crash, re-run, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clap_core.data.shards import read_index, read_shards
from clap_demo.synth import write_corpus

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def clap(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# slow tier, for CI's budget (~1 min: two `clap` processes, each with its own Ray): CI runs `clap preprocess` as a
# cluster job (tests/e2e/test_job_submit.py) and the crash-and-resume in-process
# (tests/integration/test_preprocess.py, tests/integration/test_preprocess_scale.py)
@pytest.mark.slow
def test_cli_crash_then_rerun_resumes(tmp_path):
    manifest = write_corpus(tmp_path / "corpus", 10, seed=7, seconds=(0.6, 1.0))
    out = str(tmp_path / "shards")
    # relative paths, as a user types them: Ray's workers run elsewhere, the job must resolve them first
    common = ["preprocess", "--input", str(manifest.relative_to(tmp_path)), "--output", "shards", "ray.concurrency=2",
              "output.rows_per_unit=2"]

    crashed = clap(*common, "debug.crash_after_units=1", cwd=tmp_path)
    assert crashed.returncode != 0 and "SimulatedCrash" in crashed.stderr, crashed.stderr[-3000:]
    assert (tmp_path / "shards" / "_done").is_dir() and not (tmp_path / "shards" / "manifest.json").exists()

    resumed = clap(*common, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = [line for line in resumed.stdout.splitlines() if line.startswith("clap preprocess:")]
    assert len(summary) == 1 and "clips in 10, rows out 10" in summary[0] and "realtime factor" in summary[0]
    print("\n" + summary[0])
    doc = read_index(out)
    # Ray may print its own lines to stdout before the command's; the result is the one JSON object line.
    result = [json.loads(line) for line in resumed.stdout.splitlines() if line.startswith('{"output"')]
    assert len(result) == 1 and result[0]["rows_out"] == doc["rows_out"] == 10, resumed.stdout[-3000:]
    ids = read_shards(out, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == [f"synth-7-{i:06d}" for i in range(10)]

    bad = clap("preprocess", "--input", str(manifest), "--output", out, "audio.min_secs=1")
    assert bad.returncode == 2 and "audio.min_seconds" in bad.stderr
