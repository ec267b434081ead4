"""pipelines/console.py without starting Ray: the log file of a command, logger routing, rank 0's step lines."""
from __future__ import annotations

import io
import logging

import pytest

from clap_core.train.run_log import step_line, validation_line
from pipelines import console

ENTRY = {"train/loss": 1.5, "train/temperature": 0.07, "train/lr": 1e-4, "train/samples_per_s": 10.0,
         "train/data_wait_share": 0.25}


class ListQueue(list):
    put = list.append  # what the callback calls on its ray.util.queue.Queue


def test_report_becomes_rank0_step_line_once():
    lines = ListQueue()
    callback = console._step_lines_callback(lines, total_steps=10)
    rank1 = {"step": 4, **ENTRY, "train/loss": 9.0}  # every rank reports; the line is rank 0's
    callback.after_report(None, [{"step": 4, **ENTRY}, rank1], None)
    assert lines == ["step 4/10  loss 1.5000  temperature 0.0700  lr 1.00e-04  10.0 samples/s  data-wait 25%"]
    assert lines[0] == step_line({"step": 4, "loss": 1.5, "temperature": 0.07, "lr": 1e-4, "samples_per_s": 10.0,
                                  "data_wait_share": 0.25}, 10)  # the very line rank 0 writes to its stdout

    val = {"val/t2a/R@1": 0.5, "val/t2a/R@5": 0.75, "val/a2t/R@1": 0.25, "val/t2a/mAP@10": 0.6}
    callback.after_report(None, [{"step": 5, "train/temperature_text": 0.05, **ENTRY, **val}], None)
    assert lines[1].startswith("step 5/10  loss 1.5000  temperature a2t 0.0700 t2a 0.0500  lr")
    assert lines[2] == validation_line(5, val) == "step 5  validation  t2a/R@1 0.500  t2a/R@5 0.750  " \
                                                  "a2t/R@1 0.250  t2a/mAP@10 0.600"
    callback.after_report(None, [{"step": 6}], None)  # a report without train metrics prints nothing
    assert len(lines) == 3


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
