"""The console of a job whose Ray worker dies, on the session's Ray: the raylet's message about the dead worker
reaches the driver through Ray's error subscriber (not a logger, not fd 2): one console line, the whole message in
the log file, and the failure line says what Ray lost (pipelines/console.py)."""
import os
import time

import pytest
import ray
from ray.exceptions import WorkerCrashedError

from pipelines import console

pytestmark = pytest.mark.integration


@ray.remote(max_retries=0, num_cpus=0)
def crash():
    os._exit(1)  # as the OOM killer or a segfault ends a worker: no Python exception


def test_dead_worker_is_one_console_line_and_the_failure_says_why(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    console.plan_log("embed", str(tmp_path / "emb"))
    log = tmp_path / "emb" / "logs" / "clap-embed.log"
    try:
        console.init_ray()  # Ray is up: opens the log file and catches the raylet's messages
        with pytest.raises(WorkerCrashedError) as crashed:
            ray.get(crash.remote())
        deadline = time.monotonic() + 60  # the raylet pushes its message a moment after the task failed
        while "(raylet) A worker died" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert console.report_failure("embed", crashed.value)
    finally:
        console.finish_log()
    out, err = capsys.readouterr()
    assert "(raylet)" not in out + err
    ray_lines = [x for x in err.splitlines() if x.startswith("clap embed: Ray: ")]
    assert f"clap embed: Ray: A worker died or was killed while executing a task by an unexpected system error. " \
           f"(details in {log})" in ray_lines
    assert err.splitlines()[-1] == ("clap embed: WorkerCrashedError: The worker died unexpectedly while executing "
                                    f"this task. (traceback in {log})")
    text = log.read_text()
    assert "(raylet) A worker died or was killed" in text and "Worker exit type: SYSTEM_ERROR" in text
