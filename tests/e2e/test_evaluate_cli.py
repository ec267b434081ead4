"""The real `clap evaluate` command on shards: metrics.json, markdown, PNG, rejects counted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clap_core.data.rejects import read_rejects
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from tests.fixtures.shards import write_shards

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def clap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(root / "ckpt")
    write_shards(root / "shards", per_label=2, corrupt=1)
    return root


def test_evaluate_zero_shot_and_retrieval(setup):
    root = setup
    done = clap("evaluate", "--checkpoint", str(root / "ckpt"), "--data", str(root / "shards"), "--split", "test",
                "--task", "zero-shot", "--labels", "low tone, high tone, buzz, siren", "--output", str(root / "zs"))
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((root / "zs" / "metrics.json").read_text())
    assert metrics["labels"] == ["low tone", "high tone", "buzz", "siren"] and metrics["num_audio"] == 6
    assert metrics["num_rejects"] == 1 and metrics["rejects_by_reason"] == {"undecodable": 1}
    rejects = read_rejects(str(root / "zs")).to_pylist()  # OUTPUT/_rejects/*.parquet, as every job writes them
    assert [(r["id"], r["stage"], r["reason"]) for r in rejects] == [("corrupt-0", "decode", "undecodable")]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and sum(map(sum, metrics["confusion_matrix"])) == 6
    assert (root / "zs" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy=" in done.stdout

    done = clap("evaluate", "--checkpoint", str(root / "ckpt"), "--data", str(root / "shards"),
                "--task", "retrieval", "--output", str(root / "rt"))
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((root / "rt" / "metrics.json").read_text())
    assert metrics["num_captions"] == 12  # two captions per clip
    assert {"t2a/R@1", "a2t/R@10", "t2a/mAP@10", "a2t/median_rank"} <= set(metrics)
    assert "| t2a/R@1 |" in (root / "rt" / "metrics.md").read_text()


def test_evaluate_names_the_problem_for_a_missing_checkpoint(setup):
    done = clap("evaluate", "--checkpoint", str(setup / "nope"), "--data", str(setup / "shards"),
                "--task", "retrieval", "--output", str(setup / "x"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"clap evaluate: checkpoint error: {setup / 'nope'}: no such checkpoint folder"
