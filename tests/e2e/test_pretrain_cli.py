"""The real `clap pretrain` command in a subprocess, on relative paths, and a config typo. (`clap preprocess`
through the CLI, on relative paths too: tests/e2e/test_preprocess_cli.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.shards import write_shards
from tests.integration.test_pretrain import heldout_t2a_r1, read_split

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def clap(*args: str, timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def test_clap_pretrain_cli_on_relative_paths(tmp_path):
    data = tmp_path / "shards"
    write_shards(data, per_label=4, split="train")
    valid = write_shards(data, per_label=2, split="valid")
    # relative paths, as a user types them: Ray workers run elsewhere, the job must resolve them first
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
    r1, n = heldout_t2a_r1(ClapModel.from_pretrained(run / "final"), read_split(data, "valid"))
    assert n == len(valid) and r1 == r1  # the exported model embeds every held-out clip to a number


def test_clap_pretrain_config_typo_names_the_key(tmp_path):
    proc = clap("pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "train.batchsize=8")
    assert proc.returncode == 2
    assert "train.batchsize" in proc.stderr and "train.batch_size" in proc.stderr
