"""A real two-node Ray cluster on this machine (head + one worker node), for `ray job submit` tests.

Token authentication is on when `env` says so (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN): the nodes, the
`ray` CLI and the HTTP clients here all use the token from that environment, as a user's shell would.

Both nodes bind to 127.0.0.1 on free ports and run `ray start --block` in their own process groups;
stopping sends SIGTERM to exactly those groups (what `ray start --block` turns into stopping the
processes it started), then SIGKILL after a grace period. Never the CLI's machine-wide stop command: it
would end every Ray process on the machine, including other test sessions'.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

RAY = str(Path(sys.executable).parent / "ray")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the Ray CLI colours its output


@dataclass
class LocalRayCluster:
    env: dict
    num_cpus: int = 4
    head_cpus: int | None = None  # the head node's CPUs (default num_cpus); fewer push a job's work to worker nodes
    procs: list[subprocess.Popen] = field(default_factory=list)
    temp_dir: str = ""
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict:
        """What a client sends with token authentication on (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN in env)."""
        token = self.env.get("RAY_AUTH_TOKEN") if self.env.get("RAY_AUTH_MODE") == "token" else None
        return {"Authorization": f"Bearer {token}"} if token else {}

    def __post_init__(self) -> None:
        # The head declares a lost node dead after 3 failed health checks 1 s apart (Ray's defaults: 5 checks 3 s
        # apart, 15 s of a node-loss test spent waiting). A killed node refuses the check at once; a live but
        # busy one has 5 s to answer each check, so a loaded 2-core machine does not lose a node that is there.
        for name, value in (("period_ms", "1000"), ("timeout_ms", "5000"), ("failure_threshold", "3")):
            self.env.setdefault(f"RAY_health_check_{name}", value)

    def start(self, timeout_s: float = 120) -> "LocalRayCluster":
        # Ray's socket paths must stay short: a fresh folder directly under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        # the head's own ports and its components' ports, drawn together: all different
        head_ports = distinct_free_ports(3 + len(NODE_PORT_NAMES))
        self.gcs_port, self.dashboard_port, client_port = head_ports[:3]
        try:
            self._spawn(["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                         f"--ray-client-server-port={client_port}", f"--temp-dir={self.temp_dir}"], worker_ports=20000,
                        node_ports=head_ports[3:])
            self._wait_for_dashboard(timeout_s)
            self._spawn([f"--address=127.0.0.1:{self.gcs_port}"], worker_ports=21000)
            self._wait_for_nodes(2, timeout_s)
        except BaseException:
            self.stop(grace_s=5)  # a node that did come up must not outlive the failed start
            raise
        return self

    def kill_worker_node(self, timeout_s: float = 180) -> None:
        """SIGKILL the last worker node's whole process group (raylet, its workers): a node that disappears.
        Returns once the head has declared it dead (its health checks failed)."""
        proc = self.procs.pop()
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)
        self._wait_for_nodes(len(self.procs), timeout_s, exact=True)

    def add_worker_node(self, timeout_s: float = 120) -> None:
        """A fresh worker node (a replacement for a lost one)."""
        self._spawn([f"--address=127.0.0.1:{self.gcs_port}"], worker_ports=22000 + 1000 * (len(self.procs) % 5))
        self._wait_for_nodes(2, timeout_s)

    def submit_async(self, entrypoint: list[str], working_dir: str | Path) -> str:
        """`ray job submit --no-wait`: the submission id."""
        cmd = [RAY, "job", "submit", "--no-wait", f"--address={self.dashboard_url}", f"--working-dir={working_dir}",
               "--runtime-env-json", '{"excludes": [".venv", "*.egg-info", "demo_output"]}', "--", *entrypoint]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)
        match = re.search(r"raysubmit_\w+", ANSI.sub("", done.stdout + done.stderr))
        if not match:
            raise RuntimeError(f"`ray job submit` printed no submission id: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return match.group(0)

    def wait_job(self, submission_id: str, timeout_s: float = 900) -> "JobResult":
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url, headers=self.auth_headers)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = str(client.get_job_status(submission_id).value)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return JobResult(submission_id, status, client.get_job_logs(submission_id))
            time.sleep(2)
        raise TimeoutError(f"job {submission_id} still running after {timeout_s} s")

    def _spawn(self, args: list[str], worker_ports: int, node_ports: list[int] | None = None) -> None:
        node_ports = node_ports or distinct_free_ports(len(NODE_PORT_NAMES))
        ports = [f"--{name}-port={port}" for name, port in zip(NODE_PORT_NAMES, node_ports)]
        ports += [f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 999}"]
        cpus = self.head_cpus if "--head" in args and self.head_cpus is not None else self.num_cpus
        cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
               "--disable-usage-stats", *ports, *args]
        log = open(Path(self.temp_dir) / f"node{len(self.procs)}.log", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if self._dashboard_json("/api/version", timeout_s=2) is not None:
                return
            time.sleep(1)
        raise TimeoutError(f"Ray dashboard did not come up in {timeout_s} s: {self.logs()}")

    def _wait_for_nodes(self, count: int, timeout_s: float, exact: bool = False) -> None:
        """Until the head counts `count` alive nodes (more, unless `exact`), asked over the dashboard's state API
        every 0.5 s (a `ray status` process costs ~2 s of CPU on a 2-core machine)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            active = len(self.alive_nodes())
            if active == count or (active > count and not exact):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{count} Ray nodes did not register in {timeout_s} s: {self.logs()}")

    def alive_nodes(self) -> list[dict]:
        """The cluster's ALIVE nodes, from the dashboard's state API (none while it does not answer)."""
        answer = self._dashboard_json("/api/v0/nodes?limit=1000&detail=0", timeout_s=10)
        return [n for n in answer["data"]["result"]["result"] if n["state"] == "ALIVE"] if answer else []

    def _dashboard_json(self, path: str, timeout_s: float) -> dict | None:
        """GET a dashboard API path, authenticated as a user's client is; None while the dashboard is starting,
        restarting or too busy to answer."""
        request = urllib.request.Request(f"{self.dashboard_url}{path}", headers=self.auth_headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {proc.returncode}: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(Path(self.temp_dir).glob("node*.log")))

    def submit(self, entrypoint: list[str], working_dir: str | Path, timeout_s: float = 600,
               env: dict | None = None) -> "JobResult":
        """`ray job submit` (waits for the job, streams its logs), then the job's final status.

        The CLI runs with the cluster's environment (the token in RAY_AUTH_TOKEN, as a user's shell has it)
        unless `env` says otherwise; a refused submission comes back with status "REFUSED"."""
        cmd = [RAY, "job", "submit", f"--address={self.dashboard_url}", f"--working-dir={working_dir}",
               "--runtime-env-json", '{"excludes": [".venv", "*.egg-info", "demo_output"]}', "--", *entrypoint]
        done = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=timeout_s)
        logs = ANSI.sub("", done.stdout + done.stderr)
        match = re.search(r"raysubmit_\w+", logs)
        if not match:
            if done.returncode != 0:
                return JobResult("", "REFUSED", logs)
            raise RuntimeError(f"`ray job submit` printed no submission id: {logs[-3000:]}")
        from ray.job_submission import JobSubmissionClient  # HTTP client only: no ray.init in the test process

        client = JobSubmissionClient(self.dashboard_url, headers=self.auth_headers)
        return JobResult(match.group(0), str(client.get_job_status(match.group(0)).value), logs)

    def job_ids(self) -> list[str]:
        """Submission ids of every job the cluster knows (authenticated)."""
        from ray.job_submission import JobSubmissionClient

        return [j.submission_id for j in JobSubmissionClient(self.dashboard_url, headers=self.auth_headers).list_jobs()
                if j.submission_id]

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM each node's own process group (worker first), SIGKILL what is left after grace_s."""
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class JobResult:
    submission_id: str
    status: str  # SUCCEEDED / FAILED / STOPPED, from the job submission API
    logs: str  # what `ray job submit` streamed: the job's own output included

    @property
    def tail(self) -> str:
        """The end of the logs without Ray Data's progress lines (what an assertion message should show)."""
        lines = [line for line in self.logs.splitlines() if "row/s]" not in line and line.strip()]
        return "\n".join(lines)[-4000:]


NODE_PORT_NAMES = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc",
                   "runtime-env-agent", "metrics-export")  # `ray start --<name>-port`, one per node component


def distinct_free_ports(count: int) -> list[int]:
    """`count` different free ports: the OS may hand the same just-released port out twice, and `ray start`
    refuses two components on one port (seen: node manager and dashboard agent both given 54043)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
