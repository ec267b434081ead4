"""`ray job submit` against a real two-node local Ray cluster with token authentication: a submission without
the token is refused; `clap preprocess` as a cluster job survives the loss of its worker node (CI); `clap pretrain`
and `clap embed` as cluster jobs on its shards (slow tier).

The cluster (a head and a worker node, started by tests/e2e/ray_cluster.py) reads and writes object
storage on the test's S3-protocol server, as pods read S3 on Kubernetes; the credentials reach the
nodes through their environment, never through the job's runtime_env or command line.
"""
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest

from clap_core.config import load_config
from clap_core.data.inputs import read_inputs
from clap_core.preprocess.config import PreprocessConfig
from clap_core.preprocess.plan import plan_units
from clap_core.preprocess.unit import process_unit
from pipelines.job_configs import default_config_path
from tests.e2e.ray_cluster import LocalRayCluster
from tests.fixtures.leaks import assert_no_secret, files_under
from tests.integration.test_pretrain import write_corpus

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


# Recognisable, fake: the leak check below greps the job logs for it.
RAY_TOKEN = "clapfaketoken" + "5f0c2a9e7d1b4c3a8e6f0d2b9a7c5e1f3d"
PREPROCESS = ["output.expected_clip_seconds=1.0", "output.rows_per_unit=4", "ray.concurrency=4"]


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """Token authentication on, as Ray 2.60 and the cluster manifests have it: the token comes from the env."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN, RAY_USAGE_STATS_ENABLED="0",
               HOME=str(tmp_path_factory.mktemp("home")),  # no ~/.ray/auth_token of this machine's user
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    c = LocalRayCluster(env=env).start()
    yield c
    c.stop(grace_s=1)  # the module's own cluster, its jobs ended: nothing to flush (SIGTERM alone takes ~15 s)


def test_submission_without_the_token_is_refused(cluster):
    before = cluster.job_ids()
    for name, token in (("no token", None), ("wrong token", "clapwrongtoken" + "0" * 50)):
        env = dict(cluster.env)
        env.pop("RAY_AUTH_TOKEN")
        if token:
            env["RAY_AUTH_TOKEN"] = token
        job = cluster.submit(["python", "-c", "print('SHOULD NOT RUN')"], REPO, timeout_s=120, env=env)
        assert job.status == "REFUSED", f"{name}: {job.logs[-2000:]}"
        assert "SHOULD NOT RUN" not in job.logs
        assert re.search(r"401|403|[Uu]nauthori[sz]ed|[Ff]orbidden|token", job.logs), f"{name}: {job.logs[-2000:]}"
    assert cluster.job_ids() == before  # nothing was accepted


@pytest.fixture(scope="module")
def shards(cluster, s3_server, tmp_path_factory):
    """(bucket, tmp folder, job): `clap preprocess` submitted as a job, which loses its worker node mid-job (the
    node's process group killed once the first units are committed)."""
    s3, bucket = boto3.client("s3"), f"clap-jobs-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("jobs")
    manifest = write_corpus(tmp / "audio", {"train": 48, "valid": 8, "test": 8})
    for path in manifest.parent.iterdir():
        s3.upload_file(str(path), bucket, f"raw/{path.name}")
    lost = cluster.submit_async(["clap", "preprocess", "--input", f"s3://{bucket}/raw/manifest.jsonl", "--output",
                                 f"s3://{bucket}/shards", *PREPROCESS], REPO)
    deadline = time.monotonic() + 300
    while not s3.list_objects_v2(Bucket=bucket, Prefix="shards/_done/").get("KeyCount"):
        assert time.monotonic() < deadline, "no unit committed in 300 s"
        time.sleep(0.5)
    cluster.kill_worker_node()
    job = cluster.wait_job(lost)
    assert job.status == "SUCCEEDED", job.tail
    return bucket, tmp, job


def test_preprocess_job_survives_a_lost_worker_node(cluster, shards):
    """The job finishes on the head node, and every shard equals the undisturbed one, which this test computes
    itself, unit by unit, without Ray. Nothing printed or written holds a credential."""
    bucket, tmp, job = shards
    s3 = boto3.client("s3")
    shard_manifest = json.loads(s3.get_object(Bucket=bucket, Key="shards/manifest.json")["Body"].read())
    assert shard_manifest["rows_out"] == 64 and shard_manifest["rejects"]["rows"] == 0  # rows lost: 0

    cfg = load_config(PreprocessConfig, default_config_path("preprocess"), PREPROCESS)
    reference = tmp / "undisturbed"
    expected = [shard["path"] for unit in plan_units(read_inputs(f"s3://{bucket}/raw/manifest.jsonl"), cfg).units
                for shard in process_unit(unit, cfg, str(reference)).shards]
    assert sorted(shard["path"] for shard in shard_manifest["shards"]) == sorted(expected)
    for path in expected:
        assert s3.get_object(Bucket=bucket, Key=f"shards/{path}")["Body"].read() == (reference / path).read_bytes()
    assert_no_credential(cluster, bucket, [job.logs])


# ~2 min more on 2 cores; CI runs the node lost during `clap pretrain` as a driver (test_faults_embed_probe.py)
@pytest.mark.slow
def test_pretrain_and_embed_as_submitted_jobs(cluster, shards):
    bucket, _, _ = shards
    s3, root = boto3.client("s3"), f"s3://{bucket}"
    cluster.add_worker_node()  # a replacement for the node the preprocess job lost
    pretrain = cluster.submit(["clap", "pretrain", "--data", f"{root}/shards", "--output", f"{root}/runs/job",
                               "--model", "tiny", "train.steps=4", "train.batch_size=8", "train.checkpoint_every=4",
                               "train.eval_every=0", "scaling.num_workers=2", "scaling.resources_per_worker={CPU: 1}",
                               "data.shuffle_buffer=0"], REPO)
    assert pretrain.status == "SUCCEEDED", pretrain.tail
    metrics = json.loads(s3.get_object(Bucket=bucket, Key="runs/job/metrics.json")["Body"].read())
    assert metrics["step"] == 4
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/job/final/")["Contents"]}
    assert "runs/job/final/model.safetensors" in keys

    embed = cluster.submit(["clap", "embed", "--checkpoint", f"{root}/runs/job/final", "--input", f"{root}/shards",
                            "--split", "test", "--output", f"{root}/embeddings"], REPO)
    assert embed.status == "SUCCEEDED", embed.tail
    assert '"rows": 8' in embed.logs and '"rejects": 0' in embed.logs
    assert_no_credential(cluster, bucket, [pretrain.logs, embed.logs])


def assert_no_credential(cluster: LocalRayCluster, bucket: str, printed: list[str]) -> None:
    """No credential (the fake AWS keys of tests/conftest.py, the Ray token) in what the jobs printed, in any
    object of the bucket, or in any file under the cluster's folder (every node and job log)."""
    s3 = boto3.client("s3")
    secrets = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], RAY_TOKEN]
    objects = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    written = {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in objects}
    written.update(files_under(Path(cluster.temp_dir), skip="runtime_resources"))  # the uploaded working dir
    assert_no_secret(secrets, written, printed)
