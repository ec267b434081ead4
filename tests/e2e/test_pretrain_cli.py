"""The real `clap preprocess` then `clap pretrain` commands in subprocesses, and a config typo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_pretrain import heldout_t2a_r1, read_split, write_corpus

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def clap(*args: str, timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def test_clap_preprocess_then_pretrain_cli(tmp_path):
    write_corpus(tmp_path / "audio", {"train": 64, "valid": 12})
    data = tmp_path / "shards"
    # relative paths, as a user types them: Ray workers run elsewhere, the jobs must resolve them first
    proc = clap("preprocess", "--input", "audio/manifest.jsonl", "--output", "shards",
                "output.expected_clip_seconds=1.0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows out 76" in proc.stdout
    run = tmp_path / "run"
    proc = clap("pretrain", "--data", "shards", "--output", "run", "--model", "tiny",
                "train.steps=4", "train.batch_size=8", "train.log_every=2", "train.checkpoint_every=4",
                "train.eval_every=0", "scaling.num_workers=1", "scaling.resources_per_worker={CPU: 0.5}",
                "data.decode_tasks=1", "data.shuffle_buffer=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Ray's own warnings may follow on stdout: the summary is the last JSON line
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["step"] == 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [2, 4]
    assert (run / "final" / "model.safetensors").is_file() and (run / "curves.png").is_file()

    from clap_core.model.clap import ClapModel
    r1, _ = heldout_t2a_r1(ClapModel.from_pretrained(run / "final"), read_split(data, "valid"))
    assert 0.0 <= r1 <= 1.0


def test_clap_pretrain_config_typo_names_the_key(tmp_path):
    proc = clap("pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "train.batchsize=8")
    assert proc.returncode == 2
    assert "train.batchsize" in proc.stderr and "train.batch_size" in proc.stderr
