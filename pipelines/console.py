"""What a `clap` command shows on the console, and where the rest goes.

By default a user sees each stage's own lines (step lines, summaries, one progress bar per dataset) and
nothing of Ray's internals: Ray Data's per-operator bars are off, and the logs of helper servers (the demo's
local S3 endpoint) go to a log file in the output folder. `clap --verbose ...` (or CLAP_VERBOSE=1) shows
everything, as Ray prints it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

VERBOSE_ENV = "CLAP_VERBOSE"
VERBOSE_FLAG = "--verbose"
CHATTY_LOGGERS = ("werkzeug", "moto", "botocore", "urllib3", "s3transfer")  # a request line per S3 call


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def init_ray(**kwargs):
    """ray.init for a `clap` command: a local Ray, or the cluster of RAY_ADDRESS; quiet data progress unless
    verbose (one bar per dataset, none per operator)."""
    import ray

    if not ray.is_initialized():
        ray.init(**kwargs)
    configure_ray_data()
    return ray


def configure_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = verbose()
    if not verbose():
        ctx.print_on_execution_start = False


def log_to_file(path: Path, names: tuple[str, ...] = CHATTY_LOGGERS) -> Path:
    """Send these loggers to `path` instead of the console (unless verbose)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in names:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = verbose()
    return path
