"""What `clap preprocess` and `clap pretrain` print: their own lines, one log-file line, no Ray internals.

Ray's driver loggers, its C++ side's lines on fd 2 and the messages the raylet pushes to every driver ("(raylet)
WARNING: N PYTHON worker processes have been started ...") go to OUTPUT/logs/clap-<command>.log and the workers'
output stays in Ray's session logs (pipelines/console.py); `--verbose` brings Ray's lines back.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clap_demo.synth import write_corpus

# slow tier (`make test-all`): two `clap` runs in subprocesses, ~1 min on 2 cores; the console rules themselves are
# unit-tested in CI (tests/unit/pipelines/test_console.py)
pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_LINE = re.compile(r"\b(INFO|WARNING|DEBUG)\b|logging_progress|\(pid=|pid=\d+\)|Running Dataset|Ray instance"
                      r"|\(raylet\)|\w+\.(cc|h):\d+")  # the raylet's pushed messages, C++ log lines


def clap(*args: str, cwd: Path = REPO) -> tuple[int, str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("CLAP_VERBOSE", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)
    return proc.returncode, proc.stdout, proc.stderr


def ray_lines(text: str) -> list[str]:
    """Lines of Ray's loggers, workers, raylet or C++ side."""
    lines = [ANSI.sub("", line) for line in text.replace("\r", "\n").splitlines()]
    return [x for x in lines if RAY_LINE.search(x)]


def test_preprocess_then_pretrain_console(tmp_path):
    manifest = write_corpus(tmp_path / "corpus", 8, seed=3, seconds=(0.6, 1.0))
    rc, out, err = clap("preprocess", "--input", str(manifest), "--output", str(tmp_path / "shards"),
                        "ray.concurrency=1", "output.rows_per_unit=4")
    assert rc == 0, err[-3000:]
    log = tmp_path / "shards" / "logs" / "clap-preprocess.log"
    assert ray_lines(out + err) == [], (out + err)[-3000:]
    assert [x for x in out.splitlines() if x.startswith("clap preprocess: clips in 8, rows out 8")]
    assert f"clap preprocess: Ray's logs in {log} (--verbose shows them here)" in err.splitlines()
    assert "preprocess units: 100%" in err  # the one progress bar, on stderr
    text = log.read_text()
    assert "Started a local Ray instance" in text and "execution finished" in text, text[-2000:]
    assert "the workers' output is in Ray's session logs" in text

    # pretraining: rank 0's step lines reach the console once each, through the driver
    rc, out, err = clap("pretrain", "--data", str(tmp_path / "shards"), "--output", str(tmp_path / "run"),
                        "--model", "tiny", "train.steps=2", "train.batch_size=4", "train.log_every=1",
                        "train.checkpoint_every=2", "train.eval_every=0", "scaling.num_workers=1",
                        "scaling.resources_per_worker={CPU: 0.5}", "data.decode_tasks=1", "data.shuffle_buffer=0")
    assert rc == 0, err[-3000:]
    assert ray_lines(out + err) == [], (out + err)[-3000:]
    assert [x.split("  ")[0] for x in out.splitlines() if x.startswith("step ")] == [
        "step 1/2", "step 2/2", "step 2"]  # step 2 ends with a validation line
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert f"step 2/2  loss {history[-1]['loss']:.4f}" in out
    assert json.loads([x for x in out.splitlines() if x.startswith("{")][-1])["step"] == 2
    assert "Started a local Ray instance" in (tmp_path / "run" / "logs" / "clap-pretrain.log").read_text()


def test_preprocess_verbose_shows_ray(tmp_path):
    manifest = write_corpus(tmp_path / "corpus", 4, seed=4, seconds=(0.6, 1.0))
    rc, out, err = clap("--verbose", "preprocess", "--input", str(manifest), "--output", str(tmp_path / "shards"),
                        "ray.concurrency=1", "output.rows_per_unit=4")
    assert rc == 0, err[-3000:]
    assert "Started a local Ray instance" in err and "Running Dataset" in err, err[-3000:]
    assert [x for x in out.splitlines() if x.startswith("clap preprocess: clips in 4, rows out 4")]
    assert "Started a local Ray instance" in (tmp_path / "shards" / "logs" / "clap-preprocess.log").read_text()


def test_tune_probe_console_is_one_bar_over_the_trials(tmp_path):
    import torch

    from clap_core.model.clap import ClapModel
    from clap_core.model.config import get_model_config
    from clap_demo.synth_meld import write_meld

    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(tmp_path / "ckpt")
    write_meld(tmp_path / "corpus", "reorganised", {"train": 4, "dev": 3, "test": 3}, corrupt=False, seed=1)
    rc, out, err = clap("tune-probe", "--meld", str(tmp_path / "corpus"), "--checkpoint", str(tmp_path / "ckpt"),
                        "--output", str(tmp_path / "sweep"), "tune.num_samples=2", "tune.max_concurrent_trials=2",
                        "tune.grace_period=1", "search.epochs=[1,2]", "embed.concurrency=1")
    assert rc == 0, err[-3000:]
    assert ray_lines(out + err) == [], (out + err)[-3000:]
    assert "Trial status" not in out + err and "Configuration for experiment" not in out + err
    assert len(out.splitlines()) == 1 and json.loads(out)["status"] == "finished"  # the JSON result line only
    assert "trials: 100%" in err and "2/2" in err
    log = (tmp_path / "sweep" / "logs" / "clap-tune-probe.log").read_text()
    # Tune's experiment table, and the C++ core worker's warning about the embedding actors (written to fd 2)
    assert "Configuration for experiment" in log and "core_worker.cc" in log, log[-3000:]
