"""What a `clap` command shows on the console, and where the rest goes.

By default a `clap` job that runs Ray shows one line naming its log file, its own step and summary lines
(`clap pretrain`'s: pipelines/train_console.py), one progress bar per stage (`progress()`, Ray Data's global bar
per dataset in a terminal, the sweep's trials bar of pipelines/tune_console.py) and errors, one line each
(report_failure; the traceback goes to the log file).
Everything else goes to `<output>/logs/clap-<command>.log` (JobLog): the lines of Ray's Python loggers in the
driver (`ray`, `ray.data` with its "Running Dataset ... Total Progress" blocks, `ray.train`, `ray.tune`, ...), of
the chatty client libraries (the demo's local S3 server), of Ray's C++ side, which writes to file descriptor 2
itself (pipelines/native_stderr.py points fd 2 at the log file; `sys.stderr`, the console, stays on the
terminal), and the messages the raylet pushes to every driver (`(raylet) WARNING: N PYTHON worker processes
...`); one of those saying workers were killed or died (an OOM kill) also gets one console line. Output of Ray's
workers (their progress bars, logs, "actor is dead") is not forwarded to the driver
(`ray.init(log_to_driver=False)`); it stays in Ray's session logs, whose folder the log file names. A failing
worker still fails the job on the driver, which says why. `clap --verbose ...` (or CLAP_VERBOSE=1) shows
everything on the console, as Ray prints it.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from pipelines.native_stderr import NativeStderr

VERBOSE_ENV = "CLAP_VERBOSE"
VERBOSE_FLAG = "--verbose"
CHATTY_LOGGERS = ("werkzeug", "moto", "botocore", "urllib3", "s3transfer",  # a request line per S3 call
                  "optuna")  # "[I ...] A new study created in memory" from the sweep's search
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray.util")  # Ray's driver-side loggers
LOG_DIR = "logs"  # <output>/logs/clap-<command>.log
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Ray's words for lost work, most telling first: the failure line quotes the sentence holding the first one found
SYSTEM_FAILURES = ("low on memory", "killed due to memory pressure", "OUT_OF_MEMORY", "died unexpectedly",
                   "worker process has died", "is dead or unavailable")
# a raylet message saying workers were killed or died (OOM kills, crashes) gets a console line too
WORKERS_LOST = re.compile(r"memory pressure|low on memory|\bOOM\b|crashed|\bdied\b|\bdead\b|exits? unexpectedly",
                          re.IGNORECASE)

_job_log: JobLog | None = None  # the log file of the running command (one per process)
_planned_log: tuple[str, str] | None = None  # (command, output) whose log file init_ray opens
_workers_silent = False  # this process started Ray with log_to_driver=False: no worker line reaches the console
_started_ray = False  # init_ray started (or connected) Ray for the running command: finish_log shuts it down


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


class JobLog:
    """`<output>/logs/clap-<command>.log`: written in place for a local output; for an s3:// output written in a
    local temporary folder and uploaded next to the output at the end of the command (finish_log; at exit at the
    latest)."""

    def __init__(self, command: str, output: str):
        from clap_core import storage

        self.name = f"clap-{command}.log"
        self.key = (command, output)
        output = storage.absolute(output)
        self.remote = storage.join(output, LOG_DIR, self.name) if "://" in output else None
        folder = Path(tempfile.mkdtemp(prefix="clap-log-")) if self.remote else Path(output) / LOG_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / self.name
        self.handler = logging.FileHandler(self.path)
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self.handler.setLevel(logging.INFO)  # Ray Data's DEBUG lines stay in its own ray-data.log
        self.where = self.remote or str(self.path)
        self.native_stderr = NativeStderr(self.path)  # started by start_log unless verbose

    def close(self) -> None:
        """Give fd 2 back to the terminal, detach from every logger, close the file and upload it (s3:// output);
        idempotent."""
        self.native_stderr.stop()
        if self.handler.stream is None:
            return
        for logger in [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                               if isinstance(lg, logging.Logger)]:
            logger.removeHandler(self.handler)
        self.handler.close()
        if self.remote:
            from clap_core import storage

            try:
                storage.upload(self.path, self.remote)
            except Exception as e:  # the job's result stands; only its log stays local
                print(f"log file kept at {self.path} (upload to {self.remote} failed: {e})", file=sys.stderr)


def plan_log(command: str, output: str) -> None:
    """The command's log file, opened when Ray starts (init_ray): a user mistake found before that writes
    nothing into the output, and `clap embed` claims its (empty) output folder first."""
    global _planned_log
    _planned_log = (command, output)


def open_planned_log(what: str = "logs") -> None:
    """Open the planned log file (plan_log) now, if one is planned and not open yet: init_ray does, and a command
    that runs without Ray (`clap embed`'s in-process runner), whose chatty libraries' lines and native stderr go
    to it as they would in a Ray job. `what`: how the console line names its contents."""
    global _planned_log
    if _planned_log is not None:
        start_log(*_planned_log, what=what)
        _planned_log = None


def start_log(command: str, output: str, what: str = "Ray's logs") -> JobLog:
    """Open the command's log file, send Ray's and the chatty libraries' loggers to it (and only to it unless
    verbose), say where it is, in one line on stderr, and (unless verbose) point fd 2 at it: native code's lines
    go there, `sys.stderr` stays on the terminal."""
    global _job_log
    if _job_log is not None and _job_log.key != (command, output):  # another command in the same process
        _job_log.close()
        _job_log = None
    if _job_log is None:
        _job_log = JobLog(command, output)
        atexit.register(_job_log.close)
        print(f"clap {command}: {what} in {_job_log.where}"
              f"{'' if verbose() else ' (--verbose shows them here)'}", file=sys.stderr, flush=True)
        if not verbose():
            _job_log.native_stderr.start()
    route_loggers(_job_log.handler)
    return _job_log


def report_failure(command: str, error: BaseException) -> bool:
    """A job that fails with a log file open (not verbose): its traceback (with the worker's, when Ray wrapped
    it) goes to the log file and the console gets one line, the error and the log's path. False when there is no
    log file to hold the traceback: the caller lets it print."""
    if not quiet():
        return False
    _log_only("clap.console").error("clap %s failed", command, exc_info=error)
    print(f"clap {command}: {type(error).__name__}: {failure_reason(error)} (traceback in {_job_log.where})",
          file=sys.stderr, flush=True)
    return True


def _log_only(name: str) -> logging.Logger:
    """A logger that writes into the open log file only."""
    logger = logging.getLogger(name)
    logger.propagate = False
    for handler in list(logger.handlers):
        if handler is not _job_log.handler:  # the file of an earlier command
            logger.removeHandler(handler)
    if _job_log.handler not in logger.handlers:
        logger.addHandler(_job_log.handler)
    return logger


def failure_reason(error: BaseException) -> str:
    """What the failure line says: the sentence where Ray says work was lost (an OOM kill, a dead worker, actor
    or node; also in the exceptions it chained), else the last line of the error (a worker's error, as Ray wraps
    it, ends with the worker's own exception line)."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(str(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)  # as tracebacks do
    for marker in SYSTEM_FAILURES:
        for text in texts:
            for line in text.splitlines():
                if marker in line:
                    return _sentence(line, line.index(marker))
    lines = [x.strip() for x in texts[0].splitlines() if x.strip()] if texts else []
    return lines[-1] if lines else ""


def _sentence(line: str, at: int, limit: int = 300) -> str:
    """The sentence of `line` around position `at` (Ray's messages chain many on one line), at most `limit`."""
    previous = line.rfind(". ", 0, at)
    start = previous + 2 if previous >= 0 else 0
    end = line.find(". ", at)
    sentence = line[start:end + 1 if end >= 0 else len(line)].strip()
    return sentence if len(sentence) <= limit else sentence[:limit - 3] + "..."


def finish_log() -> None:
    """The end of a command (pipelines.cli): shut down the Ray it started (its shutdown lines still go to the
    log), give fd 2 back to the terminal, close its log file, upload it for an s3:// output."""
    global _job_log, _planned_log, _started_ray
    if _started_ray:
        import ray

        ray.shutdown()
        _started_ray = False
    _stop_catching_raylet_messages()
    if _job_log is not None:
        _job_log.close()
    _job_log = _planned_log = None


def route_loggers(handler: logging.Handler, names: tuple[str, ...] = RAY_LOGGERS + CHATTY_LOGGERS) -> None:
    """These loggers (and Ray's child loggers that have their own console handler) write to `handler`; unless
    verbose their console handlers are removed, so nothing of them reaches the terminal."""
    names = tuple(names) + tuple(n for n, lg in logging.root.manager.loggerDict.items()
                                 if n.startswith("ray.") and isinstance(lg, logging.Logger) and lg.handlers)
    for name in dict.fromkeys(names):
        logger = logging.getLogger(name)
        if not verbose():
            for h in list(logger.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    logger.removeHandler(h)  # a console handler (Ray's own, or ray.data's)
        # once per record: on "ray" and on each logger that does not pass its records up to "ray"
        if handler not in logger.handlers and (name == "ray" or name in CHATTY_LOGGERS or not logger.propagate):
            logger.addHandler(handler)
        if name in CHATTY_LOGGERS:
            logger.setLevel(logging.INFO)
            logger.propagate = verbose()


def init_ray(worker_output: bool = False, data_bars: bool = True, **kwargs):
    """ray.init for a `clap` command: a local Ray, or the cluster of RAY_ADDRESS. With a log file started
    (start_log) and not verbose, workers' output is not forwarded to the console (`worker_output=True` keeps
    it) and Ray's driver loggers write to the log file; Ray Data shows one bar per dataset, none per operator.
    `data_bars=False`: no Ray Data bar at all (the command draws its own, see progress()).
    Returns ray.init's context, or None when Ray was already up."""
    import ray

    global _workers_silent, _started_ray
    open_planned_log("Ray's logs")
    context = None
    if _job_log is not None:
        _catch_raylet_messages()
    if not ray.is_initialized():
        if quiet():
            kwargs.setdefault("log_to_driver", worker_output)
            kwargs.setdefault("logging_format", LOG_FORMAT)  # ray.init re-formats the "ray" handlers: ours too
            # `import ray` after start_log (the demo) adds a console handler to "ray": off before ray.init's
            # first line ("Started a local Ray instance"), which then goes to the log file
            route_loggers(_job_log.handler)
        context = ray.init(**kwargs)
        _workers_silent = not kwargs.get("log_to_driver", True)
        _started_ray = _job_log is not None
    configure_ray_data(data_bars)
    if _job_log is not None:
        route_loggers(_job_log.handler)  # again: Ray's libraries imported since set up their own handlers
        if context is not None:
            logging.getLogger("ray").info("clap: the workers' output is in Ray's session logs: %s",
                                          ray_logs_folder(ray))
    return context


def _catch_raylet_messages() -> None:
    """The messages the raylet pushes to every driver reach it through Ray's error subscriber thread, which hands
    each to `ray._private.worker.print_to_stdstream` (looked up at each call) with pid "raylet", and Ray prints
    them on sys.stdout: no logger, no switch. While a log file is open and not verbose, they go to the log file
    instead (raylet_message); everything else (workers' lines when forwarded) is printed as Ray does."""
    import ray._private.worker as ray_worker

    if getattr(ray_worker.print_to_stdstream, "clap_original", None) is not None:
        return  # already caught
    original = ray_worker.print_to_stdstream

    def print_to_stdstream(data, ignore_prefix=False):
        if data.get("pid") != "raylet" or not quiet():
            return original(data, ignore_prefix)
        for message in data.get("lines", []):
            raylet_message(message)

    print_to_stdstream.clap_original = original
    ray_worker.print_to_stdstream = print_to_stdstream


def _stop_catching_raylet_messages() -> None:
    worker = sys.modules.get("ray._private.worker")
    original = getattr(getattr(worker, "print_to_stdstream", None), "clap_original", None)
    if original is not None:
        worker.print_to_stdstream = original


def raylet_message(message: str) -> None:
    """A message the raylet pushed to this driver: into the log file; one saying workers were killed or died (OOM
    kills, crashes) also gets one console line, its first sentence: a job that then fails or stalls says why."""
    if _job_log is None:
        return
    _log_only("clap.raylet").warning("(raylet) %s", message)
    if not WORKERS_LOST.search(message):
        return
    first = next((x.strip() for x in message.splitlines() if x.strip()), "")
    end = first.find(". ")
    print(f"clap {_job_log.key[0]}: Ray: {_sentence(first, max(end, 0))} (details in {_job_log.where})",
          file=sys.stderr, flush=True)


def ray_logs_folder(ray) -> str:
    """Where Ray keeps the session's logs: a local folder when this process started Ray, else the cluster's."""
    try:
        return ray._private.worker._global_node.get_logs_dir_path()  # noqa: SLF001 (no public accessor)
    except AttributeError:
        return "the Ray cluster's session logs (/tmp/ray/session_latest/logs on each node)"


def configure_ray_data(global_bars: bool = True) -> None:
    """Ray Data's progress: one global bar per dataset (none with global_bars=False), none per operator, no
    execution plan printed; all of it when verbose."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = global_bars or verbose()
    ctx.enable_operator_progress_bars = verbose()
    if not verbose():
        ctx.print_on_execution_start = False


def progress(items, total: int, what: str):
    """One progress bar with ETA on stderr for a stage whose driver sees each item finish (a terminal redraws
    it; a log or pipe gets a line every 30 s at most); none when verbose (Ray Data's bars are on then)."""
    return bar(items, total, what, disable=verbose())


def bar(items, total: int, what: str, disable: bool = False):
    """A tqdm bar with ETA on the console (sys.stderr) for `what` ("preprocess units"; its last word is the
    unit): a terminal redraws it, a log or pipe gets a line every 30 s at most."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=what, unit=what.split()[-1], file=sys.stderr, disable=disable,
                mininterval=0.5 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)


def workers_silent() -> bool:
    """This process started Ray with workers' output off: a worker's print never reaches the console."""
    return _workers_silent


def quiet() -> bool:
    """A command's log file is open and not verbose: library output goes to the log, the console gets bars."""
    return _job_log is not None and not verbose()


@contextlib.contextmanager
def stdout_to_log():
    """While a log file is open and not verbose: what is printed on sys.stdout (a library's reports: Ray Tune's
    experiment tables) goes to the log file. The command prints its own stdout lines outside this block."""
    if not quiet():
        yield
        return
    with open(_job_log.path, "a", buffering=1) as log, contextlib.redirect_stdout(log):
        yield
