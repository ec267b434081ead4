"""File descriptor 2 into a file, the Python console still on the terminal.

Ray's C++ side (core worker, raylet client, GCS client) writes its errors straight to the process's file
descriptor 2 (`[2026-...] core_worker.cc:...`), where Python's logging cannot reach them. NativeStderr points fd 2
at a file at the OS level (os.dup2), so those lines and anything else native code or child processes write there
land in the file, and gives `sys.stderr` a file object on a duplicate of the original fd 2: the command's own
lines (print(..., file=sys.stderr), tqdm bars, the failure line) still reach the terminal.

    redirect = NativeStderr(Path("out/logs/clap-embed.log")).start()
    os.write(2, b"native\\n")           # -> the file
    print("ours", file=sys.stderr)      # -> the terminal
    redirect.stop()                      # fd 2 and sys.stderr as they were (idempotent)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


class NativeStderr:
    def __init__(self, path: Path):
        self.path = path
        self.terminal_fd: int | None = None  # a duplicate of the original fd 2 while redirected
        self.console = None  # sys.stderr while redirected: a text file on terminal_fd
        self.previous = None  # sys.stderr before start()

    @property
    def active(self) -> bool:
        return self.terminal_fd is not None

    def start(self) -> NativeStderr:
        if self.active:
            return self
        for stream in (sys.stderr, sys.__stderr__):  # what Python buffered so far goes where it was meant to
            if stream is not None:
                stream.flush()
        try:
            log_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # appends beside logging's
            self.terminal_fd = os.dup(2)  # not inheritable: child processes get the file as their stderr
        except OSError:  # no fd 2 at all (a daemon): nothing to redirect
            return self
        os.dup2(log_fd, 2)
        os.close(log_fd)
        self.previous = sys.stderr
        if _writes_to_fd(sys.stderr, 2):  # the usual case; under a capturing harness (pytest) sys.stderr stays put
            # never closed: a handler or bar that took sys.stderr meanwhile keeps writing to the terminal after stop
            self.console = open(self.terminal_fd, "w", buffering=1,  # noqa: SIM115
                                encoding=getattr(sys.stderr, "encoding", None) or "utf-8", errors="backslashreplace")
            sys.stderr = self.console
        return self

    def stop(self) -> None:
        """fd 2 and sys.stderr back to what they were; idempotent (the end of a command, and at exit)."""
        if not self.active:
            return
        if self.console is not None:
            self.console.flush()
            if sys.stderr is self.console:
                sys.stderr = self.previous
        if sys.__stderr__ is not None:
            sys.__stderr__.flush()  # Python-level lines meant for fd 2 (the log) before it switches back
        os.dup2(self.terminal_fd, 2)
        if self.console is None:  # else the console file owns terminal_fd (one fd per command, kept open)
            os.close(self.terminal_fd)
        self.terminal_fd = self.console = self.previous = None


def _writes_to_fd(stream, fd: int) -> bool:
    try:
        return stream is not None and stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False
