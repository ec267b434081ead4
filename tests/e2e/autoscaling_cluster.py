"""Ray's local autoscaling cluster (the fake multi-node provider) without Ray's machine-wide stop command.

`ray.cluster_utils.AutoscalingCluster` runs the CLI's `stop --force` on start and shutdown (that would end
every Ray process on the machine, other test sessions' included) and reads a base config the wheel
does not ship. This helper writes the whole autoscaler config itself and runs the head as
`ray start --head --block` in its own process group: the autoscaler (autoscaler v2, as the KubeRay
manifests use) starts fake worker nodes as processes of this group when tasks or actors wait for
CPUs, and removes them after `idle_timeout_s`. Stopping sends SIGTERM, then SIGKILL, to that group
only, and kills any process still naming this cluster's temp folder (the worker nodes' raylets).

    cluster = AutoscalingRayCluster(env, worker_cpus=1, max_workers=3, gpu_workers=1).start()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}   # `clap ...` subprocesses join it
    cluster.worker_nodes()                                  # alive worker nodes now
    cluster.stop()
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.ray_cluster import distinct_free_ports

RAY = str(Path(sys.executable).parent / "ray")
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the provider's fixed head id
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


@dataclass
class AutoscalingRayCluster:
    env: dict
    worker_cpus: int = 1
    max_workers: int = 3
    idle_timeout_s: float = 10.0
    gpu_workers: int = 0  # a second worker type of 1 CPU + 1 (fake) GPU with min 0 and this max
    proc: subprocess.Popen | None = None
    temp_dir: str = ""
    port: int = 0
    _gcs: object = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> dict:
        """The autoscaler config: a 0-CPU head and one worker type with min 0, max `max_workers`."""
        return {
            "cluster_name": "fake_multinode", "max_workers": self.max_workers + self.gpu_workers,
            # "external" + the fake provider's class: the "fake_multinode" type would read provider
            # defaults from an example.yaml that the Ray wheel does not ship.
            "provider": {"type": "external", "module": PROVIDER, "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address,
                         "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID},
            "available_node_types": {
                "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
                "cpu_worker": {"resources": {"CPU": self.worker_cpus, "object_store_memory": 200_000_000},
                               "node_config": {}, "min_workers": 0, "max_workers": self.max_workers},
                **({"gpu_worker": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200_000_000},
                                   "node_config": {}, "min_workers": 0, "max_workers": self.gpu_workers}}
                   if self.gpu_workers else {}),
            },
            "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_s / 60, "docker": {},
            **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False,
        }

    def start(self, timeout_s: float = 120, attempts: int = 2) -> "AutoscalingRayCluster":
        """Start the head; on a loaded machine Ray's fixed 30 s raylet registration wait can expire, so a
        head that exits during start-up is stopped and started once more."""
        for attempt in range(attempts):
            try:
                return self._start(timeout_s)
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1:
                    raise
        return self

    def _start(self, timeout_s: float) -> "AutoscalingRayCluster":
        self.temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # Ray's socket paths must stay short
        # one `ray start` refuses two components on one port: 8 distinct ones (tests/e2e/ray_cluster.py)
        self.port, *ports = distinct_free_ports(8)
        names = ["dashboard", "ray-client-server", "node-manager", "object-manager", "dashboard-agent-listen",
                 "runtime-env-agent", "metrics-export"]
        config = Path(self.temp_dir) / "autoscaler.json"
        config.write_text(json.dumps(self.config()))
        env = {**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
               "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               "--num-cpus=0", "--include-dashboard=false", f"--autoscaling-config={config}",
               f"--temp-dir={self.temp_dir}", *(f"--{name}-port={port}" for name, port in zip(names, ports)),
               "--disable-usage-stats"]
        log = open(Path(self.temp_dir) / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.proc.returncode}: {self.logs()}")
            if (Path(self.temp_dir) / "session_latest").exists():
                try:
                    if self.nodes():
                        return self
                except Exception:  # the GCS is not up yet  # noqa: BLE001
                    self._gcs = None
            time.sleep(1)
        raise TimeoutError(f"the autoscaling head did not come up in {timeout_s} s: {self.logs()}")

    def nodes(self) -> list[dict]:
        """Every node the GCS knows: {"alive", "cpus"}. A plain GCS client: the test process keeps its own
        Ray (ray_local) and never joins this cluster."""
        from ray._raylet import GcsClient

        if self._gcs is None:
            self._gcs = GcsClient(address=self.address)
        infos = self._gcs.get_all_node_info(timeout=10).values()
        return [{"alive": n.state == 0, "cpus": n.resources_total.get("CPU", 0),
                 "gpus": n.resources_total.get("GPU", 0)} for n in infos]

    def worker_nodes(self, gpu: bool = False) -> int:
        """Alive worker nodes (the head has 0 CPUs); with gpu=True only those with a GPU."""
        return sum(1 for n in self.nodes() if n["alive"] and n["cpus"] > 0 and (n["gpus"] > 0 or not gpu))

    def logs(self) -> str:
        path = Path(self.temp_dir) / "head.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM the head's process group, SIGKILL it after grace_s, then any process of this cluster
        (its temp folder is in their command lines) that left the group."""
        self._gcs = None
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(self.proc.pid, signal.SIGKILL)
        for pid in own_processes(self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def own_processes(marker: str) -> list[int]:
    """PIDs whose command line names `marker` (this cluster's unique temp folder)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry))
    return found


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
