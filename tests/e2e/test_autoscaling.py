"""`clap preprocess` on Ray's local autoscaling cluster: a head with 0 CPUs and a 1-CPU worker type with
min 0, max 3 (tests/e2e/autoscaling_cluster.py). The job must make the autoscaler add at least 2 worker
nodes (sampled from the GCS while it runs), write exactly what a plain local Ray writes, row by row, and
the nodes must go away after the idle timeout; then `clap embed` on those shards, the same way. (`clap embed
--gpus 1` on a fake GPU node type is not in this test: on the shared 2-core machine the fifth fake node did not
come up reliably.)"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clap_core.data import embeddings
from clap_core.data.shards import read_shards
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.preprocess.config import load_preprocess_config
from clap_demo.synth import write_corpus
from pipelines.embed import embed_dataset
from pipelines.preprocess import preprocess
from tests.e2e.autoscaling_cluster import AutoscalingRayCluster, own_processes

pytestmark = pytest.mark.e2e  # the preprocess case runs in CI (~1 min), the embed case in the slow tier
REPO = Path(__file__).resolve().parents[2]
JOB = ["output.rows_per_unit=2", "augment.copies=2", "augment.splits=[train,valid,test]"]  # copies of every clip
CLIPS = 64  # 192 rows: the second node joins ~11 s in on a quiet machine; 24 clips ended ~3 s later, or before
POOL = ["ray.min_workers=2", "ray.max_workers=3"]  # more actors than the 0-CPU cluster has at start
# Ray Data asks Ray's autoscaler for more nodes every 10 s by default; 2 s keeps the test short.
FAST_RAY_DATA = {"RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "2", "RAY_DATA_CLUSTER_UTIL_AVG_WINDOW_S": "2"}


def run_sampled(cluster: AutoscalingRayCluster, args: list[str], env: dict, log_path: Path,
                gpu: bool = False) -> list[int]:
    """Run a `clap` command against the cluster; the worker nodes (or GPU nodes) sampled while it runs."""
    with open(log_path, "w") as log:
        job = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT, env={**env, **FAST_RAY_DATA, "RAY_ADDRESS": cluster.address})
        samples, deadline = [], time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline:
            samples.append(cluster.worker_nodes(gpu=gpu))
            time.sleep(1)
        job.kill()
        assert job.wait() == 0, log_path.read_text()[-3000:]
    return samples


def rows(out: str) -> dict[str, tuple]:
    return {r["id"]: (r["audio"], r["augment"], r["caption"], r["split"]) for r in read_shards(out).to_pylist()}


def wait_scaled_in(cluster: AutoscalingRayCluster, timeout_s: float = 90) -> int:
    """Worker nodes left once the idle timeout (10 s) and the autoscaler's drain have passed."""
    gone_by = time.monotonic() + timeout_s
    while cluster.worker_nodes() and time.monotonic() < gone_by:
        time.sleep(2)
    return cluster.worker_nodes()


@pytest.fixture(scope="module")
def cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    c = AutoscalingRayCluster(env, worker_cpus=1, max_workers=3, idle_timeout_s=10).start()
    yield c
    c.stop(grace_s=5)  # the module's own cluster: nothing of another test runs on it
    assert own_processes(c.temp_dir) == []


@pytest.fixture(scope="module")
def scaled(cluster, ray_local, tmp_path_factory):
    """(shards written on the autoscaling cluster, the same job's shards on the plain local Ray, nodes sampled)."""
    root = tmp_path_factory.mktemp("autoscale")
    manifest = write_corpus(root / "corpus", CLIPS, seed=4, formats=("wav",), seconds=(0.6, 0.8))
    reference = str(root / "local")
    preprocess(str(manifest), reference, load_preprocess_config(None, [*JOB, "ray.concurrency=2"]))
    assert cluster.worker_nodes() == 0
    out = str(root / "scaled")
    samples = run_sampled(cluster, ["preprocess", "--input", str(manifest), "--output", out, *JOB, *POOL],
                          cluster.env, root / "preprocess.log")
    return out, reference, samples


def test_preprocess_scales_out_and_back_on_an_autoscaling_cluster(cluster, scaled):
    out, reference, samples = scaled
    print(f"\nworker nodes sampled during clap preprocess: {samples}")
    assert max(samples) >= 2 and samples[0] < 2
    assert rows(out) == rows(reference) and len(rows(out)) == 3 * CLIPS
    assert wait_scaled_in(cluster) == 0


@pytest.mark.slow  # ~2 min more on 2 cores
def test_embed_scales_out_and_back_on_an_autoscaling_cluster(cluster, scaled, ray_local, tmp_path):
    """`clap embed --min-workers 2 --max-workers 3` asks for more actors than the idle cluster has: the
    autoscaler adds nodes for them, and the embeddings equal a run on the plain local Ray."""
    shards, _, _ = scaled
    assert wait_scaled_in(cluster) == 0
    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(tmp_path / "ckpt")
    reference = str(tmp_path / "local")
    embed_dataset(str(tmp_path / "ckpt"), shards, reference, batch_size=8, concurrency=1, precision="fp32")
    out = str(tmp_path / "scaled")
    samples = run_sampled(cluster, ["embed", "--checkpoint", str(tmp_path / "ckpt"), "--input", shards, "--output",
                                    out, "--batch-size", "8", "--precision", "fp32", "--min-workers", "2",
                                    "--max-workers", "3"], cluster.env, tmp_path / "embed.log")
    print(f"\nworker nodes sampled during clap embed: {samples}")
    assert max(samples) >= 2 and samples[0] < 2

    def by_id(output: str) -> dict[str, tuple]:
        t = embeddings.read_table(output).to_pylist()
        return {r["id"]: (np.asarray(r["audio_embedding"]), np.asarray(r["text_embedding"])) for r in t}

    got, want = by_id(out), by_id(reference)
    assert sorted(got) == sorted(want) and len(got) == 3 * CLIPS
    for key, (audio, text) in want.items():
        np.testing.assert_allclose(got[key][0], audio, atol=1e-5)
        np.testing.assert_allclose(got[key][1], text, atol=1e-5)
    assert wait_scaled_in(cluster) == 0
