"""Shipped defaults on the smallest machine a user has: `clap pretrain` and `clap embed` on a 2-CPU Ray.

The shared test Ray has 8 logical CPUs, which hides starvation: with the defaults, 2 train workers (or 2
embedding actors) took both CPUs of a 2-CPU Ray and the Ray Data tasks that read the shards waited forever.
Here a subprocess starts its own Ray with num_cpus=2 and runs both commands with the shipped scaling and data
settings (only the step count and batch size are made small); a hang fails the test at its timeout. The paths
are relative, as a user types them: Ray workers run in other folders, so the jobs must resolve them first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clap_core.model.clap import ClapModel
from tests.fixtures.shards import write_shards
from tests.integration.test_pretrain import heldout_t2a_r1, read_split

pytestmark = [pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys, ray
    from pipelines import cli
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    data, run, emb = sys.argv[1:4]
    rc = cli.main(["pretrain", "--data", data, "--output", run, "--model", "tiny", "train.steps=4",
                   "train.batch_size=4", "train.log_every=2", "train.eval_every=0", "train.checkpoint_every=4",
                   "data.min_epoch_rows=64"])  # scaling and the other data settings: as shipped
    if rc == 0:
        rc = cli.main(["embed", "--checkpoint", run + "/final", "--input", data, "--split", "valid", "--output", emb])
    ray.shutdown()
    sys.exit(rc)
""")


def test_pretrain_and_embed_defaults_run_on_2_cpus_on_relative_paths(tmp_path):
    write_shards(tmp_path / "shards", per_label=4, split="train")
    valid = write_shards(tmp_path / "shards", per_label=1, split="valid")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "shards", "run", "emb"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each of the 2 workers gets 0.5 CPU" in proc.stderr  # said, not silent
    assert "1 embedding actor" in proc.stderr
    pretrained = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"output"')][-1])
    assert pretrained["output"] == "run" and pretrained["step"] == 4
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 4 and [h["step"] for h in metrics["history"]] == [2, 4]
    assert (run / "final" / "model.safetensors").is_file() and (run / "curves.png").is_file()
    r1, n = heldout_t2a_r1(ClapModel.from_pretrained(run / "final"), read_split(tmp_path / "shards", "valid"))
    assert n == len(valid) and r1 == r1  # the exported model embeds every held-out clip to a number
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"rows"')][-1])
    assert summary == {"rows": len(valid), "rejects": 0, "reject_reasons": {}}
    assert (tmp_path / "emb" / "embeddings.json").is_file()
