"""A training worker's feed: endless (batch, seconds waited) pairs from its share of the training data.

    feed = FeedAhead(train_batches(shard, cfg, device))   # asks for the first batch at once, in a thread
    ...                                                    # import the model code, build the engine, restore
    for batch, waited in feed: ...                         # `waited`: what the loop itself blocked on

Ray Data starts a training dataset when a worker first asks its shard for a batch: it starts the split
coordinator and the decode tasks (each a fresh process that imports the tokenizer's stack), then decodes.
On 2 cores that took ~14 s before the first step, after the ~12 s in which the worker imported the model code
and built its DeepSpeed engine. FeedAhead asks first, so the two overlap. Light on purpose (no torch import):
pipelines/pretrain.py starts the feed before it imports the worker side.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator


def train_batches(shard, cfg, device) -> Iterator[tuple[dict, float]]:
    """Endless (batch, seconds waited) pairs of a Ray Data shard (anything with `iter_torch_batches`); each
    pass over the shard is one epoch with its own local shuffle. `cfg`: the PretrainConfig; `device`: a
    torch.device the batches are moved to."""
    while True:
        empty = True
        iterator = iter(shard.iter_torch_batches(
            batch_size=cfg.train.batch_size, drop_last=True, device=device,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None, prefetch_batches=cfg.data.prefetch_batches))
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            waited = time.perf_counter() - start
            if batch is None:
                break
            empty = False
            yield batch, waited
        if empty:
            raise ValueError(f"the training split holds fewer than train.batch_size={cfg.train.batch_size} "
                             "rows per worker: lower the batch size or the number of workers")


class FeedAhead:
    """Wraps an iterator of (batch, seconds waited) pairs and takes its first item in a background thread from
    construction on. The first `next` returns that item with the time it blocked for it (not the time the thread
    waited) and re-raises what the thread raised; later ones go straight to the wrapped iterator, in the caller's
    thread (the thread has ended by then: never two threads in the iterator at once)."""

    def __init__(self, batches: Iterator[tuple[Any, float]]):
        self._batches = batches
        self._first: tuple[Any, float] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(target=self._take_first, name="clap-feed-ahead",
                                                                 daemon=True)  # never keeps a finished worker alive
        self._thread.start()

    def _take_first(self) -> None:
        try:
            self._first = next(self._batches)
        except BaseException as e:  # StopIteration included: handed to the loop's first `next`
            self._error = e

    def __iter__(self) -> "FeedAhead":
        return self

    def __next__(self) -> tuple[Any, float]:
        if self._thread is None:
            return next(self._batches)
        start = time.perf_counter()
        self._thread.join()
        waited = time.perf_counter() - start
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        (batch, _), self._first = self._first, None
        return batch, waited
