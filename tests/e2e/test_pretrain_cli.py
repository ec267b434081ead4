"""The real `clap pretrain` command in a subprocess: a config typo. (`clap pretrain` and `clap embed` with the
shipped defaults on relative paths: tests/e2e/test_small_machine.py; `clap preprocess` through the CLI, on
relative paths too: tests/e2e/test_preprocess_cli.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def clap(*args: str, timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def test_clap_pretrain_config_typo_names_the_key(tmp_path):
    proc = clap("pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "train.batchsize=8")
    assert proc.returncode == 2
    assert "train.batchsize" in proc.stderr and "train.batch_size" in proc.stderr
