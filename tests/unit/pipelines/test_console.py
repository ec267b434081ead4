"""pipelines/console.py without starting Ray: the log file of a command, logger routing, rank 0's step lines, fd 2
into the log file, the raylet's messages, the failure line, Tune's trials bar."""
from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from clap_core.train.run_log import step_line, validation_line
from pipelines import console, train_console
from pipelines.native_stderr import NativeStderr

REPO = Path(__file__).resolve().parents[3]


class ListQueue(list):
    def put(self, item, timeout=None):  # what QueueLines calls on its ray.util.queue.Queue
        self.append(item)


class GoneQueue:
    def put(self, item, timeout=None):
        raise ConnectionError("the queue actor died with the driver")


def test_rank0_lines_go_through_the_queue_once_and_fall_back_to_stdout(tmp_path, capsys):
    """RunLogger on rank 0 emits each step and validation line once through the sink pretrain passes it; a gone
    queue (the driver died) puts the line on the worker's stdout instead of failing the step."""
    from clap_core.train.engine import TrainState
    from clap_core.train.run_log import RunLogger

    lines = ListQueue()
    entry = {"step": 4, "loss": 1.5, "temperature": 0.07, "lr": 1e-4, "samples_per_s": 10.0, "data_wait_share": 0.25}
    RunLogger(str(tmp_path / "run"), TrainState(), enabled=False, emit=train_console.QueueLines(lines)).interval(entry, 10)
    assert lines == []  # ranks other than 0 emit nothing
    logger = RunLogger(str(tmp_path / "run"), TrainState(), enabled=True, emit=train_console.QueueLines(lines))
    logger.interval(entry, 10)
    assert lines == ["step 4/10  loss 1.5000  temperature 0.0700  lr 1.00e-04  10.0 samples/s  data-wait 25%"]
    assert lines[0] == step_line(entry, 10)
    val = {"val/t2a/R@1": 0.5, "val/t2a/R@5": 0.75, "val/a2t/R@1": 0.25, "val/t2a/mAP@10": 0.6}
    logger.evaluation(5, val)
    assert lines[1] == validation_line(5, val) == "step 5  validation  t2a/R@1 0.500  t2a/R@5 0.750  " \
                                                  "a2t/R@1 0.250  t2a/mAP@10 0.600"
    assert capsys.readouterr().out == ""  # nothing went to this process's stdout
    assert pickle.loads(pickle.dumps(train_console.QueueLines(lines))).queue == lines  # it travels in the loop config

    train_console.QueueLines(GoneQueue())("step 6/10  loss 1.0")
    assert capsys.readouterr().out == "step 6/10  loss 1.0\n"


def test_registered_checkpoint_becomes_one_line():
    """Ray Train's controller calls after_report once per report it registers; a checkpoint gives one line."""
    lines = ListQueue()
    callback = train_console._checkpoint_lines_callback(lines)
    callback.after_report(None, [{"step": 4}, {"step": 4}], SimpleNamespace(path="/runs/r/checkpoint_00000004"))
    callback.after_report(None, [{"step": 5}, {"step": 5}], None)  # metrics only: nothing was saved
    assert lines == ["checkpoint 4 saved: /runs/r/checkpoint_00000004"]
    assert lines[0] == train_console.checkpoint_line(4, "/runs/r/checkpoint_00000004")


def test_route_loggers_moves_console_lines_to_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    name = "clap_test_console.library"
    logger = logging.getLogger(name)
    logger.propagate = False
    terminal = io.StringIO()
    logger.addHandler(logging.StreamHandler(terminal))
    handler = logging.FileHandler(tmp_path / "job.log")
    try:
        console.route_loggers(handler, names=(name,))
        logger.warning("object store is full")
        handler.flush()
        assert terminal.getvalue() == ""
        assert "object store is full" in (tmp_path / "job.log").read_text()
    finally:
        logger.handlers.clear()
        handler.close()


def test_start_log_switches_files_per_command(tmp_path, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")  # verbose: console handlers stay, only the file one is added
    monkeypatch.setattr(console, "_job_log", None)
    first = console.start_log("preprocess", str(tmp_path / "shards"))
    assert first.path == tmp_path / "shards" / "logs" / "clap-preprocess.log"
    logging.getLogger("ray").warning("line of the first command")
    second = console.start_log("embed", str(tmp_path / "emb"))
    logging.getLogger("ray").warning("line of the second command")
    second.close()
    second.close()  # idempotent (atexit calls it again)
    assert first.handler not in logging.getLogger("ray").handlers and second.handler not in logging.getLogger("ray").handlers
    assert "line of the first command" in first.path.read_text()
    assert "second" not in first.path.read_text() and "line of the second command" in second.path.read_text()


def test_s3_output_log_is_written_locally_and_uploaded(monkeypatch):
    uploads = []
    monkeypatch.setattr("clap_core.storage.upload", lambda src, dst: uploads.append((src.read_text(), dst)))
    log = console.JobLog("pretrain", "s3://bucket/run")
    assert log.where == "s3://bucket/run/logs/clap-pretrain.log" and log.path.is_file()
    log.handler.emit(logging.LogRecord("ray", logging.INFO, __file__, 1, "ray says hi", None, None))
    log.close()
    assert len(uploads) == 1 and "ray says hi" in uploads[0][0] and uploads[0][1] == log.where


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_verbose_env(monkeypatch, value, expected):
    monkeypatch.setenv(console.VERBOSE_ENV, value)
    assert console.verbose() is expected


def test_failure_is_one_console_line_and_a_logged_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(console, "_job_log", console.JobLog("pretrain", str(tmp_path / "run")))
    try:
        raise RuntimeError("Worker 0 failed:\nTraceback ...\nValueError: batch_size must be > 0")
    except RuntimeError as e:
        assert console.report_failure("pretrain", e)
    log = console._job_log.path
    console.finish_log()
    assert console._job_log is None
    err = capsys.readouterr().err.splitlines()
    assert err == [f"clap pretrain: RuntimeError: ValueError: batch_size must be > 0 (traceback in {log})"]
    text = log.read_text()
    assert "clap pretrain failed" in text and "Traceback (most recent call last)" in text and "Worker 0" in text
    assert not console.report_failure("pretrain", ValueError("no log open: the caller re-raises"))


# ---- what native code writes to fd 2 goes to the log file; the console keeps our lines (pipelines/native_stderr.py)

CHILD = """
import os, subprocess, sys
from pipelines import console
console.start_log("embed", sys.argv[1])
os.write(2, b"E core_worker.cc:123: native error line\\n")  # as Ray's C++ side writes it: fd 2, no Python
subprocess.run(["sh", "-c", "echo child process line >&2"], check=True)  # a child inherits fd 2
print("our console line", file=sys.stderr, flush=True)
console_meanwhile = sys.stderr  # e.g. a logging.StreamHandler created during the command
console.finish_log()
os.write(2, b"fd 2 is the terminal again\\n")
print("a stale console reference still works", file=console_meanwhile, flush=True)
"""


STALE = "a stale console reference still works"


RAY_START = """
import sys
from pipelines import console
console.start_log("demo", sys.argv[1])  # as `clap demo` does: the log first, `import ray` after
import ray
console.init_ray(num_cpus=1, include_dashboard=False)
ray.shutdown()
console.finish_log()
"""


def test_ray_startup_line_goes_to_the_log_not_the_console(tmp_path):
    """`import ray` after start_log adds Ray's console handler; ray.init's first line must still go to the log."""
    env = {k: v for k, v in os.environ.items() if k not in (console.VERBOSE_ENV, "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", RAY_START, str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "out" / "logs" / "clap-demo.log").read_text()
    assert "Started a local Ray instance" in log
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert proc.stderr.splitlines()[0].startswith("clap demo: Ray's logs in ")


OPTUNA_STUDY = """
import sys
from pipelines import console
console.start_log("tune-probe", sys.argv[1])  # as `clap demo` does: the log first, optuna imported after, so
from ray.tune.search.optuna import OptunaSearch  # noqa: F401  (its handler takes the console's sys.stderr)
import optuna
console.route_loggers(console._job_log.handler)  # what init_ray does again before the sweep
optuna.create_study(study_name="sweep")
console.finish_log()
"""


def test_optuna_study_line_goes_to_the_log_not_the_console(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV}
    proc = subprocess.run([sys.executable, "-c", OPTUNA_STUDY, str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "A new study created in memory with name: sweep" in (
        tmp_path / "out" / "logs" / "clap-tune-probe.log").read_text()
    assert "A new study created" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("verbose", [False, True])
def test_native_stderr_lands_in_the_log_our_lines_on_the_console(tmp_path, verbose):
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV} | ({console.VERBOSE_ENV: "1"} if verbose
                                                                                else {})
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "emb")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "emb" / "logs" / "clap-embed.log").read_text()
    native = ["E core_worker.cc:123: native error line", "child process line"]
    ours = [f"clap embed: Ray's logs in {tmp_path / 'emb' / 'logs' / 'clap-embed.log'}"
            f"{'' if verbose else ' (--verbose shows them here)'}", "our console line"]
    if verbose:  # everything on the console, nothing redirected
        assert proc.stderr.splitlines() == [ours[0], *native, ours[1], "fd 2 is the terminal again", STALE]
        assert log == ""
    else:
        assert proc.stderr.splitlines() == [*ours, "fd 2 is the terminal again", STALE]
        assert log.splitlines() == native


def test_native_stderr_keeps_a_harness_stderr(tmp_path, capsys):
    """Under a harness that replaced sys.stderr (pytest), our lines still go to it; fd 2 is restored after."""
    before = os.fstat(2)
    redirect = NativeStderr(tmp_path / "x.log").start()
    try:
        print("captured line", file=sys.stderr)
        assert os.path.samestat(os.fstat(2), os.stat(tmp_path / "x.log"))
    finally:
        redirect.stop()
        redirect.stop()  # idempotent
    assert os.path.samestat(os.fstat(2), before)
    assert capsys.readouterr().err == "captured line\n"


# ---- the raylet's pushed messages: into the log; lost workers get one console line; the failure line explains

RAYLET_POOL = ("WARNING: 4 PYTHON worker processes have been started on node: 5f1e with address: 127.0.0.1. This "
               "could be a result of using a large number of actors, or tasks blocked in ray.get() calls.")
RAYLET_OOM = ("1 Workers (tasks / actors) killed due to memory pressure (OOM), 0 Workers crashed due to other reasons "
              "at node (ID: 5f1e, IP: 10.0.0.7) over the last time period. To see more information about the Workers "
              "killed on this node, use `ray logs raylet.out -ip 10.0.0.7`\n\nRefer to the documentation on how to "
              "address the out of memory issue: https://docs.ray.io/en/latest/ray-observability/user-guides/"
              "debug-apps/debug-memory.html.")
OOM_ERROR = ("Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.7, ID: 5f1e) "
             "where the lease was running was 7.61GB / 8.00GB (0.951), which exceeds the memory usage threshold of "
             "0.95. Ray killed this worker (ID: 9a2b) because it was the most recently scheduled task.\nTop 10 memory "
             "users:\nPID\tMEM(GB)\tCOMMAND\n812\t3.1\tray::embed\nRefer to the documentation on how to address the "
             "out of memory issue: https://docs.ray.io/. Consider provisioning more memory on this node or reducing "
             "task parallelism by requesting more CPUs per task. To adjust the kill threshold, set the environment "
             "variable `RAY_memory_usage_threshold` when starting Ray.")


def test_raylet_messages_go_to_the_log_and_lost_workers_get_one_line(tmp_path, monkeypatch, capsys):
    import ray._private.worker as ray_worker

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(console, "_job_log", console.JobLog("embed", str(tmp_path / "emb")))
    original = ray_worker.print_to_stdstream
    log = console._job_log.path
    try:
        console._catch_raylet_messages()
        for message in (RAYLET_POOL, RAYLET_OOM):  # what Ray's error subscriber thread does with each message
            ray_worker.print_to_stdstream({"lines": [message], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    finally:
        console.finish_log()
    assert ray_worker.print_to_stdstream is original  # finish_log put Ray's own back
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "clap embed: Ray: 1 Workers (tasks / actors) killed due to memory pressure (OOM), 0 Workers crashed due to "
        f"other reasons at node (ID: 5f1e, IP: 10.0.0.7) over the last time period. (details in {log})"]
    text = log.read_text()
    assert f"(raylet) {RAYLET_POOL}" in text and "(raylet) 1 Workers (tasks / actors) killed" in text


def test_failure_line_names_what_ray_lost(tmp_path, monkeypatch, capsys):
    from ray.exceptions import OutOfMemoryError

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(console, "_job_log", console.JobLog("embed", str(tmp_path / "emb")))
    try:  # as Ray Data re-raises a task's OOM kill, chained
        try:
            raise OutOfMemoryError(OOM_ERROR)
        except OutOfMemoryError as oom:
            raise RuntimeError("Failed to run the embedding stage") from oom
    except RuntimeError as e:
        assert console.report_failure("embed", e)
    log = console._job_log.path
    console.finish_log()
    assert capsys.readouterr().err.splitlines() == [
        "clap embed: RuntimeError: Task was killed due to the node running low on memory. "
        f"(traceback in {log})"]
    assert "Top 10 memory users" in log.read_text()  # the whole message with the traceback
    died = RuntimeError("Training failed.\nray.exceptions.ActorDiedError: The actor died because of an error raised "
                        "in its creation task. The actor is dead because its worker process has died. Worker exit "
                        "type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error "
                        "code 2. End of file.\nSee the worker's log for details")
    assert console.failure_reason(died) == "The actor is dead because its worker process has died."
    assert console.failure_reason(ValueError("a\n\nValueError: batch_size must be > 0\n")) == \
        "ValueError: batch_size must be > 0"


# ---- Ray Tune: one bar over the trials instead of Tune's tables (pipelines/tune_console.py)

def fake_trial(status, metric=None):
    return SimpleNamespace(status=status, last_result={} if metric is None else {"f1": metric, "epoch": 3})


def test_trial_bar_counts_finished_trials_with_the_best_metric(monkeypatch, capsys):
    from pipelines.tune_console import TrialBar

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    bar = TrialBar(4, metric="f1", mode="max")
    bar.setup(stop=None, num_samples=4, total_num_samples=4)
    trials = [fake_trial("RUNNING", 0.2), fake_trial("PENDING")]
    bar.on_step_end(iteration=1, trials=trials)
    assert (bar.bar.n, bar.bar.postfix) == (0, "best f1=0.200")
    trials = [fake_trial("TERMINATED", 0.6), fake_trial("ERROR"), fake_trial("PAUSED", 0.9), fake_trial("RUNNING")]
    bar.on_step_end(iteration=2, trials=trials)
    assert (bar.bar.n, bar.bar.postfix) == (2, "best f1=0.900, 1 errored")  # a paused trial is not finished
    restored = pickle.loads(pickle.dumps(bar))  # Tuner pickles its callbacks: the bar object stays out
    assert restored.bar is None and restored.num_samples == 4 and restored.metric == "f1"
    bar.on_experiment_end(trials=[fake_trial("TERMINATED", 0.6)] * 3 + [fake_trial("ERROR")])
    assert bar.bar is None
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "trials: 100%" in err and "4/4" in err and "best f1=0.600, 1 errored" in err


def test_tune_output_silences_tunes_reporter_unless_verbose(tmp_path, monkeypatch, capsys):
    from ray.air._internal.usage import AirEntrypoint
    from ray.tune.experimental.output import get_air_verbosity
    from ray.tune.utils.callback import _create_default_callbacks

    from pipelines.tune_console import TrialBar, TuneOutput

    def tune_reporter_output(output: TuneOutput) -> str:
        """What the reporter Tune adds for these settings prints: the start, a heartbeat, the end."""
        callbacks = _create_default_callbacks(list(output.callbacks), air_verbosity=get_air_verbosity(output.verbose),
                                              entrypoint=AirEntrypoint.TUNER, metric="f1", mode="max")
        reporter = next(c for c in callbacks if type(c).__name__ == "TuneTerminalReporter")
        reporter.setup(start_time=0.0, total_samples=4)
        with output:
            reporter.experiment_started("meld_probe", str(tmp_path / "exp"), "OptunaSearch", "ASHAScheduler", 4)
            reporter.print_heartbeat([], force=True)
        return capsys.readouterr().out

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(console, "_job_log", console.JobLog("tune-probe", str(tmp_path / "sweep")))
    quiet = TuneOutput(4, "f1")
    assert quiet.verbose == 0 and [type(c) for c in quiet.callbacks] == [TrialBar]
    assert tune_reporter_output(quiet) == ""
    log = console._job_log.path.read_text()
    assert "Configuration for experiment" in log and "Trial status" not in log  # what Tune still prints: the log

    class FakeTuner:  # a restored Tuner: its pickled RunConfig had another run's settings
        _local_tuner = SimpleNamespace(run_config=SimpleNamespace(verbose=1, callbacks=["tracker", TrialBar(9)]))
        _local_tuner.get_run_config = lambda: FakeTuner._local_tuner.run_config

    quiet.apply(FakeTuner)
    assert FakeTuner._local_tuner.run_config.verbose == 0
    assert FakeTuner._local_tuner.run_config.callbacks == ["tracker", *quiet.callbacks]

    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    shown = TuneOutput(4, "f1")
    assert shown.verbose == 1 and shown.callbacks == []
    assert "Trial status" in tune_reporter_output(shown)  # --verbose: Tune's own tables
    console.finish_log()
