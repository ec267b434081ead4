"""`ray job submit` against a real two-node local Ray cluster: the pipeline stages as cluster jobs.

The cluster (a head and a worker node, started by tests/e2e/ray_cluster.py) reads and writes object
storage on the test's S3-protocol server, as pods read S3 on Kubernetes; the credentials reach the
nodes through their environment, never through the job's runtime_env or command line.
"""
import json
import os
import sys
from pathlib import Path

import boto3
import pytest

from tests.e2e.ray_cluster import LocalRayCluster
from tests.integration.test_pretrain import write_corpus

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def cluster(s3_server):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    c = LocalRayCluster(env=env).start()
    yield c
    c.stop()


def test_cluster_has_two_nodes(cluster):
    code = "import ray; ray.init(); print('NODES', len([n for n in ray.nodes() if n['Alive']]))"
    job = cluster.submit(["python", "-c", code], REPO)
    assert job.status == "SUCCEEDED", job.logs[-3000:]
    assert "NODES 2" in job.logs


def test_pipeline_stages_as_submitted_jobs(cluster, s3_bucket, tmp_path):
    s3 = boto3.client("s3")
    manifest = write_corpus(tmp_path / "audio", {"train": 48, "valid": 8, "test": 8})
    for path in manifest.parent.iterdir():
        s3.upload_file(str(path), s3_bucket, f"raw/{path.name}")
    root = f"s3://{s3_bucket}"

    job = cluster.submit(["clap", "preprocess", "--input", f"{root}/raw/manifest.jsonl", "--output",
                          f"{root}/shards", "output.expected_clip_seconds=1.0"], REPO)
    assert job.status == "SUCCEEDED", job.logs[-3000:]
    shard_manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="shards/manifest.json")["Body"].read())
    assert shard_manifest["rows_out"] == 64 and shard_manifest["rejects"]["rows"] == 0

    job = cluster.submit(["clap", "pretrain", "--data", f"{root}/shards", "--output", f"{root}/runs/job",
                          "--model", "tiny", "train.steps=4", "train.batch_size=8", "train.checkpoint_every=4",
                          "train.eval_every=0", "scaling.num_workers=2", "scaling.resources_per_worker={CPU: 1}",
                          "data.shuffle_buffer=0"], REPO)
    assert job.status == "SUCCEEDED", job.logs[-3000:]
    metrics = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/job/metrics.json")["Body"].read())
    assert metrics["step"] == 4
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/job/final/")["Contents"]}
    assert "runs/job/final/model.safetensors" in keys

    job = cluster.submit(["clap", "embed", "--checkpoint", f"{root}/runs/job/final", "--input", f"{root}/shards",
                          "--split", "test", "--output", f"{root}/embeddings"], REPO)
    assert job.status == "SUCCEEDED", job.logs[-3000:]
    assert '"rows": 8' in job.logs and '"rejects": 0' in job.logs


def test_probe_sweep_as_a_submitted_job(cluster, s3_bucket, tmp_path):
    import torch

    from clap_core.model import ClapModel
    from clap_core.model_config import get_model_config
    from clap_core.synth_meld import write_meld

    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(tmp_path / "ckpt")
    write_meld(tmp_path / "meld", layout="raw", per_emotion={"train": 4, "dev": 3, "test": 3}, corrupt=True)
    job = cluster.submit(["clap", "tune-probe", "--meld", str(tmp_path / "meld"), "--checkpoint",
                          str(tmp_path / "ckpt"), "--output", f"s3://{s3_bucket}/probe", "tune.num_samples=2",
                          "tune.max_concurrent_trials=2", "search.epochs=[3, 4]", "probe.epochs=4"], REPO)
    assert job.status == "SUCCEEDED", job.logs[-3000:]
    summary = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key="probe/summary.json")["Body"].read())
    assert summary["status"] == "finished" and summary["trials"] == 2
    assert summary["embeddings"]["rejects"] == 1  # the corrupt mp4, counted, not skipped
