"""Process settings for CPU inference: glibc's malloc keeps the memory a batch freed for the next batch.

glibc serves large blocks with mmap, unmaps them when they are freed, and trims the top of its heap once more
than a few tens of MB lie free there. An embedding batch of HTS-AT allocates and frees hundreds of MB of
activations, so every batch faulted its memory in again, page by page: 1.1 M minor page faults and 2.1 s of
system time to embed 160 clips on 2 cores, and embedding took 1.1-1.2x as long as with the settings below
(README, "Exact or fast inference").
keep_freed_memory() fixes the mmap threshold at glibc's ceiling (32 MB on 64-bit) and the trim threshold at
1 GB: blocks up to 32 MB are then reused from the heap, and the process keeps the memory of its largest batch
(its RSS stays at that peak instead of falling between batches).

The embedding paths call it on CPU (evaluating, below). It changes nothing where malloc is not
glibc's (macOS, musl, Windows, an LD_PRELOADed jemalloc or tcmalloc keeps its own policy) or where the user chose
glibc's malloc settings already (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or glibc.malloc tunables).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # freed memory kept at the heap's top before it goes back to the OS
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks (once per process). True when set; False where it does not
    apply (not glibc, or the environment already sets glibc's malloc parameters)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@contextlib.contextmanager
def logger_at(logger: logging.Logger, level: int):
    """`logger` at `level` for the block, its own level restored after (a library's notes kept off the console
    while one call runs)."""
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def evaluating(model) -> Iterator[None]:
    """The model in eval mode for the block (no dropout, batch norm's running statistics: deterministic), the
    caller's mode restored after. On CPU, glibc's malloc is set once per process to reuse the memory one batch
    frees for the next (keep_freed_memory)."""
    if model.device.type == "cpu":
        keep_freed_memory()
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
