"""A training worker's feed: endless epochs of its shard, and the first batch asked for ahead of the loop."""
from __future__ import annotations

import threading
import time

import pytest

from clap_core.train.config import load_pretrain_config
from clap_core.train.feed import FeedAhead, train_batches


class FakeShard:
    """What `ray.train.get_dataset_shard` returns, as far as train_batches uses it: one pass per iterator."""

    def __init__(self, batches: list):
        self.batches = batches
        self.passes = []  # the kwargs of each pass

    def iter_torch_batches(self, **kwargs):
        self.passes.append(kwargs)
        return iter(self.batches)


def test_train_batches_repeat_the_shard_one_pass_per_epoch():
    cfg = load_pretrain_config(None, ["train.batch_size=4", "data.shuffle_buffer=0", "data.prefetch_batches=2"])
    shard = FakeShard(["a", "b"])
    batches = train_batches(shard, cfg, "cpu")
    assert [next(batches)[0] for _ in range(5)] == ["a", "b", "a", "b", "a"]
    assert len(shard.passes) == 3
    assert shard.passes[0] == {"batch_size": 4, "drop_last": True, "device": "cpu", "local_shuffle_buffer_size": None,
                               "prefetch_batches": 2}
    with pytest.raises(ValueError, match="fewer than train.batch_size=4 rows per worker"):
        next(train_batches(FakeShard([]), cfg, "cpu"))


def slow_batches(started: threading.Event, first_after_s: float, error: Exception | None = None):
    """(batch, waited) pairs as train_batches yields them; the first one takes first_after_s to arrive."""
    started.set()
    time.sleep(first_after_s)
    if error is not None:
        raise error
    for i in range(3):
        yield f"batch {i}", 0.01 * i


def test_the_first_batch_is_asked_for_at_once_and_only_the_loops_own_wait_counts():
    started = threading.Event()
    feed = FeedAhead(slow_batches(started, first_after_s=0.2))
    assert started.wait(5)  # asked for before the loop's first `next`
    time.sleep(1.2)  # the worker builds its model meanwhile; the batch arrived after 0.2 s
    batch, waited = next(feed)
    assert batch == "batch 0" and waited < 0.1  # the loop did not wait: the thread did
    assert list(feed) == [("batch 1", 0.01), ("batch 2", 0.02)]  # the rest straight from the iterator


def test_a_first_batch_still_on_its_way_is_waited_for():
    feed = FeedAhead(slow_batches(threading.Event(), first_after_s=0.5))
    batch, waited = next(feed)
    assert batch == "batch 0" and 0.3 < waited < 5


def test_what_the_thread_raised_reaches_the_loop():
    feed = FeedAhead(slow_batches(threading.Event(), 0.0, error=ValueError("the training split is empty")))
    with pytest.raises(ValueError, match="the training split is empty"):
        next(feed)
    with pytest.raises(StopIteration):  # the generator ended with its error, as it would without FeedAhead
        next(feed)
