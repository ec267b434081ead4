"""`ray job submit` against a real two-node local Ray cluster: pipeline stages as cluster jobs."""
import os
import sys
from pathlib import Path

import pytest

from tests.e2e.ray_cluster import LocalRayCluster

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def cluster():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    c = LocalRayCluster(env=env).start()
    yield c
    c.stop()


def test_cluster_runs_a_job_on_two_nodes(cluster):
    code = "import ray; ray.init(); print('NODES', len([n for n in ray.nodes() if n['Alive']]))"
    job = cluster.submit(["python", "-c", code], REPO)
    assert job.status == "SUCCEEDED", job.logs[-3000:]
    assert "NODES 2" in job.logs
