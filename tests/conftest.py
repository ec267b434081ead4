"""Shared fixtures: one local Ray for the whole test session, and a local S3-protocol server.

Integration tests take the `ray_local` fixture: the first one starts Ray (about 4 s), the rest reuse
it. Ray gets more logical CPUs than the machine has so train workers cannot starve Ray Data ingest on
2 cores. The cluster is shut down at the end by `ray.shutdown()`, which ends only the processes this
session started (never the CLI's machine-wide stop command).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_AWS_KEY_ID = "AKIAFAKECLAPLEAK7Q3Z"  # recognisable fake credentials: a leak test greps outputs for them
FAKE_AWS_SECRET = "fakeSecretClapLeak/4b9XwYq2ZpR7sTn1VcKd8Hj3"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s: a finished or failed worker group, or a report that finds the
# previous one still queued, waits up to that long to be seen. Every Ray Train run of the session (drivers and
# `clap` processes inherit this) is polled 4x as often: seconds per run, on the ~20 runs of the suite.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Workers must import the project from this checkout even when it is not pip-installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """The shared local Ray. It starts after the S3 server so its workers inherit the endpoint/credentials env."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_proxy():
    """moto's threaded S3 server on 127.0.0.1 behind the fault proxy (tests/fixtures/s3_fault_proxy.py), which relays
    untouched until a test configures faults (`s3_faults`). Every S3 client of the session, Ray workers
    included, talks to the proxy."""
    from moto.server import ThreadedMotoServer

    from tests.fixtures.s3_fault_proxy import S3FaultProxy

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = S3FaultProxy(f"http://127.0.0.1:{port}").start()
    yield proxy
    proxy.stop()
    server.stop()


@pytest.fixture
def s3_faults(s3_proxy):
    """The session's fault proxy, reset to a plain relay after the test."""
    yield s3_proxy
    s3_proxy.configure(rate=0.0)


@pytest.fixture(scope="session")
def s3_server(s3_proxy):
    """The local S3 endpoint URL (the proxy in front of moto) with credentials in the env.

    The credentials are fake but recognisable (FAKE_AWS_*): tests/integration/test_s3_faults.py greps
    everything the jobs wrote and printed for them."""
    endpoint = s3_proxy.endpoint
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                             "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=FAKE_AWS_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_AWS_SECRET,
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields its name."""
    import uuid

    import boto3

    name = f"clap-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
