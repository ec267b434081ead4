"""`clap embed` in this process, without Ray: the runner for a small input on a machine with no cluster.

A Ray job pays a fixed cost before its first clip: starting Ray (3-5 s from the command line on 2 cores), a
worker process for the embedding actor, and that process importing torch and transformers (3.5-4 s), on a
2-core machine longer than embedding 64 clips one file at a time (~5 s). On one machine the job's steady state
is no faster than one process batching the same model either (README, "Embedding"). So for an input of at most
LOCAL_MAX_ROWS rows (a manifest, or a shard folder's split, counted from its index), with no Ray cluster given
(RAY_ADDRESS unset, no `ray start` cluster on this machine), no Ray started in this process and none of the
actor pool's options (--concurrency, --min-workers, --max-workers, --gpus), `clap embed` runs the same two
stages here: `decode_batch` on a thread a batch ahead, `EmbedBatch` on this thread. Same rows, same reject
files, same attempt-named files and index (clap_core.data.embeddings), the same columns and values: readers see
one output whichever runner wrote it.
`--runner ray` forces the Ray job; `--runner local` forces this one on an input of any size (shard rows are
streamed, and a data file is written every ROWS_PER_FILE rows, so the rows held stay bounded by that).
"""
from __future__ import annotations

import itertools
import os
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from clap_core.config import ConfigError
from clap_core.data import embeddings, shards
from pipelines.embed_input import total_within

RUNNERS = ("auto", "ray", "local")
LOCAL_MAX_ROWS = 1024  # auto: an input of at most this many rows runs in this process (~1 min on 2 cores)
ROWS_PER_FILE = 4096  # rows per data file of an in-process run (~10 MB at D=512 with captions' embeddings)
MAX_COUNTED_FILES = 64  # auto counts an unindexed shard folder's rows from at most this many Parquet footers


def choose_runner(runner: str, rows: int | None, *, cluster_options: bool) -> str:
    """"ray" or "local" for `--runner`. `rows`: the input's rows (None: not counted, a big shard folder).
    `cluster_options`: an actor-pool option was given (--concurrency, --min-workers, --max-workers, --gpus)."""
    if runner not in RUNNERS:
        raise ConfigError(f"--runner {runner!r}: choose one of {', '.join(RUNNERS)}")
    if runner != "auto":
        return runner
    if rows is None or rows > LOCAL_MAX_ROWS or cluster_options or ray_addressed():
        return "ray"
    return "local"


def ray_addressed() -> bool:
    """A Ray cluster is given (RAY_ADDRESS: `ray job submit` sets it), `ray start` has left the address of one
    that ray.init() would join (ray_address_file), or this process has started Ray already (a notebook, the
    tune-probe job): the job belongs there."""
    if os.environ.get("RAY_ADDRESS") or ray_address_file().exists():
        return True
    ray = sys.modules.get("ray")  # never imported here: importing Ray costs ~1 s
    return ray is not None and ray.is_initialized()


def ray_address_file() -> Path:
    """Where `ray start` writes its cluster's address for the drivers that come after it (Ray removes the file
    when that cluster is taken down): `ray_current_cluster` in Ray's default temp folder, found as Ray finds it
    (RAY_TMPDIR, else TMPDIR on Linux, else /tmp)."""
    if os.environ.get("RAY_TMPDIR"):
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        base = os.environ["TMPDIR"]
    else:
        base = "/tmp" if sys.platform.startswith(("linux", "darwin")) else tempfile.gettempdir()
    return Path(base) / "ray" / "ray_current_cluster"


def embed_in_process(rows: Iterable[dict], total: int | None, output: str, attempt: str, *, checkpoint: str,
                     batch_size: int, text: bool, precision: str, layers: bool) -> None:
    """Decode and embed rows (pipelines.embed_input.local_rows: manifest items, or shard rows streamed; `total` of
    them, None when not counted) in this process into OUTPUT's data/ and _rejects/ as files of `attempt`:
    reading and decoding the next batches on threads (soxr, the codecs and Parquet release the GIL;
    decode_ahead_batches), the model on this thread with this process' torch threads. The caller commits."""
    from pipelines.console import bar, open_planned_log
    from pipelines.embed import EmbedBatch, decode_batch

    open_planned_log()  # what Ray's job would log (transformers' lines, native stderr) goes to the log file
    model = EmbedBatch(checkpoint, batch_size, text, precision, layers)
    ahead = decode_ahead_batches(model)
    chunks = iter(lambda it=iter(rows): list(itertools.islice(it, batch_size)), [])  # lists of <= batch_size rows
    reading = threading.Lock()  # the decode threads take the next rows in turn (shard rows are read here)

    def next_batch() -> tuple[int, dict[str, np.ndarray]] | None:
        with reading:
            chunk = next(chunks, None)
        if chunk is None:  # the rows ran out
            return None
        return len(chunk), decode_batch(column_batch(chunk), output, attempt)  # rejects are in _rejects/ already

    written, pending_rows, part = 0, [], 0
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="clap-decode") as decoder, \
            bar(None, total, "embed clips") as progress:
        decoding = deque(decoder.submit(next_batch) for _ in range(ahead))
        while decoding:
            decoded = decoding.popleft().result()
            if decoded is None:
                continue
            decoding.append(decoder.submit(next_batch))
            size, batch = decoded
            if len(batch["id"]):
                pending_rows.append(model(batch))
                written += len(batch["id"])
            progress.update(size)
            if written >= ROWS_PER_FILE:
                embeddings.write_data_file(output, attempt, f"local_{part:06d}", pending_rows)
                pending_rows, written, part = [], 0, part + 1
    if pending_rows:
        embeddings.write_data_file(output, attempt, f"local_{part:06d}", pending_rows)


def shard_rows(input_uri: str, split: str | None) -> int | None:
    """Rows of a shard folder's split (all splits for None), for auto's choice: from the `clap preprocess`
    index, else from the Parquet footers, read until they pass LOCAL_MAX_ROWS and of at most MAX_COUNTED_FILES
    files (None beyond either: a big folder, which Ray Data reads; on S3 each footer is a request)."""
    if shards.has_index(input_uri):
        return shards.count_rows(input_uri, split)
    files = shards.shard_files(input_uri, split)
    if len(files) > MAX_COUNTED_FILES:
        return None
    return total_within((shards.file_rows(uri) for uri in files), LOCAL_MAX_ROWS)


def decode_ahead_batches(model) -> int:
    """Batches decoding at once, each on a thread of its own: 1 on CPU, where the model's threads need the
    cores; on a GPU, which embeds far faster than one thread decodes, as many as embed_audio's decode threads
    (clap_core.model.inference.decode_threads_for: up to 4)."""
    import torch

    from clap_core.model.inference import decode_threads_for

    return 1 if model.onnx else decode_threads_for(getattr(model.model, "device", torch.device("cpu")))


def column_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row dicts -> a batch of numpy columns, as Ray Data hands a batch to decode_batch: numbers as numeric
    arrays, anything else (strings, audio bytes, None) as object arrays (a fixed-width bytes array would drop
    an audio file's trailing zero bytes)."""
    batch = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        batch[key] = np.array(values) if numeric else np.array(values + [None], dtype=object)[:-1]
    return batch
