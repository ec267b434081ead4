"""A training worker's feed: endless (batch, seconds waited) pairs from its share of the training data.

    feed = Feed(passes, batch_size=16, buffer_rows=1024, to_device=...)  # a reader thread starts streaming at once
    ...                                                                    # import the model code, build the engine
    for batch, waited in feed: ...                                         # `waited`: what the loop itself blocked on

A reader thread streams the shard's passes (epochs) into a ShuffleBuffer of `buffer_rows` rows; each step takes
`batch_size` random rows out of it. Rows flow through at the stream's pace, one batch in for each batch out once
the buffer is full, so the ingest is never asked for a whole buffer at once. Ray Data's own local shuffle
(`iter_batches(local_shuffle_buffer_size=N)`, its ShufflingBatcher) builds shuffled generations instead: a new one
once fewer than N/2 rows of the current are left, and none before 1.5 N + batch rows are in hand; on 2 cores the
training loop waited 0-37% of a 10-step interval at each generation (every ~65 steps at N=1024, batch 16), though
the ingest kept up on average (README, "Training benchmark"). Here the buffer also spans epochs, so the seconds a
new pass takes to start are served from the rows already buffered, and a stall of the stream is absorbed while
rows last. The loop takes as soon as a batch's rows are in: a buffer the ingest cannot keep full mixes less, and
never makes the loop wait longer than the ingest's own pace (for a batch of distinct clips: see ShuffleBuffer).

Ray Data starts a training dataset when a worker first asks its shard for a batch: the split coordinator and the
decode tasks (each a fresh process that imports the tokenizer's stack) start, then decode. On 2 cores that took
~14 s before the first step, after the ~12 s in which the worker imported the model code and built its DeepSpeed
engine: the reader thread asks first, so the two overlap. Light on purpose (numpy only; no torch, no ray):
pipelines/pretrain.py starts the feed before it imports the worker side.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]  # column -> (rows, ...) array; every column has the same number of rows


class ShuffleBuffer:
    """Rows of fixed-shape columns in preallocated arrays: `add` appends a batch's rows, `take(n)` removes n rows,
    at random (or the oldest first without an rng) and returns them as a new batch. Removal moves the buffer's
    last rows into the holes, so each call copies O(rows added or taken), never the whole buffer. Not thread-safe:
    Feed holds its lock around `add` and `take`; `touch` runs outside it, on storage past any row held.

    With a `key` column, a random take holds n rows of distinct keys whenever the buffer holds n distinct keys (and
    all it holds, topped up with repeats, when it holds fewer). A small split repeated to fill a run puts several
    copies of each clip in the buffer: plain random takes from a 1024-row buffer put one clip twice in 51% of
    the demo's batches of 32 (its 658-row split) and in 99% of a 90-clip split's."""

    def __init__(self, rng: np.random.Generator | None, reserve_rows: int = 0, key: str | None = None):
        self.rng = rng  # None: first in, first out (data.shuffle_buffer=0)
        self.reserve_rows = reserve_rows  # rows allocated at the first add: growing a full buffer copies all of it
        self.key = key  # an int column: rows of one value are kept out of the same random take (one source clip)
        self.held_keys: dict[int, int] = {}  # key -> rows held (with a key)
        self.columns: dict[str, np.ndarray] = {}  # column -> (capacity, ...) storage; rows [0, len) hold data
        self.rows = 0
        self.touched = 0  # storage rows [0, touched) have had their pages faulted in (np.empty maps them lazily)

    def __len__(self) -> int:
        return self.rows

    def add(self, batch: Batch) -> None:
        n = len(next(iter(batch.values()))) if batch else 0
        if n == 0:
            return
        if not self.columns:  # shapes and dtypes of the first batch; grown by doubling past reserve_rows
            rows = max(self.reserve_rows, 4 * n, 64)
            self.columns = {k: np.empty((rows, *v.shape[1:]), v.dtype) for k, v in batch.items()}
            self.touched = 0
        if batch.keys() != self.columns.keys():
            raise ValueError(f"a batch with columns {sorted(batch)} after {sorted(self.columns)}")
        if self.key is not None and self.key not in batch:
            raise ValueError(f"a batch without the key column {self.key!r}: columns {sorted(batch)}")
        capacity = len(next(iter(self.columns.values())))
        if self.rows + n > capacity:
            grown = max(2 * capacity, self.rows + n)
            for k, old in self.columns.items():
                new = np.empty((grown, *old.shape[1:]), old.dtype)
                new[:self.rows] = old[:self.rows]
                self.columns[k] = new
        for k, v in batch.items():
            self.columns[k][self.rows:self.rows + n] = v  # raises on a row shape that differs from the first batch's
        self.rows += n
        if self.key is not None:
            for k in batch[self.key].tolist():
                self.held_keys[k] = self.held_keys.get(k, 0) + 1
        self.touched = max(self.touched, self.rows)

    def touch(self, n: int) -> None:
        """Faults in the pages of the next n storage rows past those touched: Feed's reader calls it outside its
        lock, so a later `add` under the lock only copies (a 16-row batch of 10-s rows into fresh pages took
        ~10 ms more, the loop waiting on the lock; faulting the whole reserve at the first add, ~2 GB, kept the
        loop from its first batch for seconds). Rows at or past `touched` hold no data: only this thread writes
        there, in `add`, after this call."""
        if not self.columns:
            return
        end = min(self.touched + n, len(next(iter(self.columns.values()))))
        for v in self.columns.values():
            v[self.touched:end] = 0  # numpy releases the GIL for large assignments
        self.touched = max(self.touched, end)

    def can_take(self, n: int, full: bool) -> bool:
        """Whether a take of n rows now is as good as it gets: n rows held, and n distinct keys among them unless
        the buffer is `full` (no more rows will come before a take; e.g. a split with fewer clips than a batch)."""
        if n > self.rows:
            return False
        return self.rng is None or self.key is None or full or len(self.held_keys) >= n

    def take(self, n: int) -> Batch:
        if n > self.rows:
            raise ValueError(f"take({n}) from a buffer of {self.rows} rows")
        if self.rng is None:  # the oldest rows, in order; the rest move to the front (FIFO is for buffer 0: few rows)
            out = {k: v[:n].copy() for k, v in self.columns.items()}
            for v in self.columns.values():
                v[:self.rows - n] = v[n:self.rows].copy()
            self.rows -= n
            return self._release(out)
        picked = self._pick(n)  # (n,) distinct row indices, in random order
        out = {k: v[picked] for k, v in self.columns.items()}  # fancy indexing: copies
        last = self.rows - n
        holes = np.sort(picked[picked < last])  # taken rows below the new end, refilled ...
        tail = np.setdiff1d(np.arange(last, self.rows), picked, assume_unique=True)  # ... by kept rows above it
        for v in self.columns.values():
            v[holes] = v[tail]
        self.rows = last
        return self._release(out)

    def _release(self, out: Batch) -> Batch:
        if self.key is not None:
            for k in out[self.key].tolist():
                left = self.held_keys[k] - 1
                if left:
                    self.held_keys[k] = left
                else:
                    del self.held_keys[k]
        return out

    def _pick(self, n: int) -> np.ndarray:
        if self.key is None:
            return self.rng.choice(self.rows, size=n, replace=False)
        order = self.rng.permutation(self.rows)  # (rows,) the held rows in random order
        _, first = np.unique(self.columns[self.key][order], return_index=True)  # each key's first place in order
        first.sort()
        if len(first) < n:  # fewer distinct keys than a batch: every one of them, then other rows at random
            rest = np.ones(self.rows, bool)
            rest[first] = False
            first = np.concatenate([first, np.flatnonzero(rest)[:n - len(first)]])
        return order[first[:n]]


class Feed:
    """Endless (batch, seconds waited) pairs: a daemon reader thread calls `passes()` for each pass over the
    shard and adds its numpy batches to a ShuffleBuffer, waiting while the buffer holds `buffer_rows` rows or more;
    each `next` takes `batch_size` rows (random ones when buffer_rows > 0; with a `key`, of distinct keys), passes
    them through `to_device` and returns them with the seconds it waited for them. Between reads the reader also
    takes the next batch ahead and puts it through `to_device` (`ready`), so the loop finds its rows gathered and
    on its device (a 16-row batch of 10-s clips is 30 MB to copy, as Ray Data's iterator did in its own threads);
    while the reader waits on the stream, the loop takes from the buffer itself. An error of the stream, or a pass
    with fewer than batch_size rows, is raised by the next `next` (the rows still buffered are not trained on)."""

    def __init__(self, passes: Callable[[], Iterable[Batch]], batch_size: int, buffer_rows: int,
                 to_device: Callable[[Batch], object] = lambda batch: batch, seed: int | None = None,
                 key: str | None = None):
        self.passes = passes
        self.batch_size = batch_size
        self.buffer_rows = max(buffer_rows, batch_size)  # the reader adds while fewer are buffered
        self.to_device = to_device
        self.buffer = ShuffleBuffer(np.random.default_rng(seed) if buffer_rows > 0 else None,
                                    reserve_rows=self.buffer_rows + 2 * batch_size,  # + a batch of the stream
                                    key=key)  # ShuffleBuffer: rows of one key in distinct batches
        self.ready: object | None = None  # the next batch, taken out of the buffer and through to_device ahead
        self.preparing = False  # the reader is putting a taken batch through to_device (the loop waits for it)
        self.lock = threading.Condition()  # guards buffer, ready, preparing, error, closed; notified on changes
        self.error: BaseException | None = None
        self.closed = False
        self.rows_read = 0  # rows the reader has added (tests, logs)
        self.thread = threading.Thread(target=self._read, name="clap-feed-reader", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                rows = 0
                for batch in self.passes():
                    if not self._add(batch):
                        return
                    rows += len(next(iter(batch.values()))) if batch else 0
                if rows < self.batch_size:
                    raise ValueError(f"the training split holds fewer than train.batch_size={self.batch_size} rows "
                                     f"per worker ({rows} in a pass): lower the batch size or the number of workers")
        except BaseException as e:  # handed to the loop's next `next`
            with self.lock:
                self.error, self.preparing = e, False
                self.lock.notify_all()

    def _add(self, batch: Batch) -> bool:
        """Adds the batch once there is room, preparing the next batch ahead meanwhile; False once closed."""
        n = len(next(iter(batch.values()))) if batch else 0
        while True:
            with self.lock:
                if self.closed:
                    return False
                if self.ready is None and self._can_take():  # gather the next batch ahead
                    rows, self.preparing = self.buffer.take(self.batch_size), True
                elif len(self.buffer) < self.buffer_rows:
                    self.buffer.add(batch)
                    self.rows_read += n
                    self.lock.notify_all()
                    break
                else:  # full, and a batch is ready: wait for the loop's next take
                    self.lock.wait()
                    continue
            ready = self.to_device(rows)  # outside the lock: a device copy here overlaps the step
            with self.lock:
                self.ready, self.preparing = ready, False
                self.lock.notify_all()
        if self.buffer.touched < self.buffer.reserve_rows:  # outside the lock: the next adds' pages (only this
            self.buffer.touch(2 * n)  # thread writes past the buffered rows)
        return True

    def _can_take(self) -> bool:  # under the lock
        return self.buffer.can_take(self.batch_size, full=len(self.buffer) >= self.buffer_rows)

    def __iter__(self) -> "Feed":
        return self

    def __next__(self) -> tuple[object, float]:
        start = time.perf_counter()
        with self.lock:
            while self.error is None and self.ready is None and (self.preparing or not self._can_take()):
                self.lock.wait()
            if self.error is not None:
                raise self.error
            rows, batch, self.ready = None, self.ready, None
            if batch is None:  # the reader is waiting on the stream: take what it left
                rows = self.buffer.take(self.batch_size)
            self.lock.notify_all()
        waited = time.perf_counter() - start
        return (self.to_device(rows) if batch is None else batch), waited

    def close(self) -> None:
        """Stops the reader once its current batch arrives (the thread is a daemon: it never keeps a process)."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()


def shard_passes(shard, batch_size: int, prefetch_batches: int) -> Callable[[], Iterator[Batch]]:
    """`passes` for Feed from a Ray Data shard (anything with `iter_batches`): each call is one epoch of numpy
    batches, in the shard's order (the Feed shuffles)."""
    return lambda: iter(shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                           prefetch_batches=prefetch_batches))


def torch_batch(device) -> Callable[[Batch], dict]:
    """numpy batch -> dict of torch tensors on `device` (the arrays are fresh copies: no tensor shares a buffer)."""
    import torch

    def convert(batch: Batch) -> dict:
        return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    return convert


def buffer_rows_for(shuffle_buffer: int, train_rows: int, num_workers: int) -> int:
    """A worker's shuffle buffer: data.shuffle_buffer rows, at most two passes of the worker's share of the
    training split (a small split is read again and again to fill the run). Two, because the buffer holds the end
    of one pass with the start of the next, a clip's two copies among them: with one pass's worth, 2% of a 90-clip
    split's batches of 32 still held a clip twice, with two none (a simulation of the stream). More holds more
    copies of the same clips: it mixes no better and costs memory (1.9 MB a 10-s row: 2 GB for 1024 rows)."""
    if shuffle_buffer <= 0:
        return 0
    return max(1, min(shuffle_buffer, 2 * -(-train_rows // max(1, num_workers))))


def train_feed(shard, cfg, device, train_rows: int) -> Feed:
    """The Feed of a training worker: `cfg` the PretrainConfig, `device` a torch.device, `train_rows` the training
    split's rows (the buffer's bound)."""
    batch_size = cfg.train.batch_size
    buffer_rows = buffer_rows_for(cfg.data.shuffle_buffer, train_rows, cfg.scaling.num_workers)
    return Feed(shard_passes(shard, batch_size, cfg.data.prefetch_batches), batch_size, buffer_rows,
                torch_batch(device), key="clip_key")  # PairBatchTransform's key of each row's source clip
