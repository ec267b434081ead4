"""A training worker's feed: a reader thread streams endless passes of its shard into a shuffle buffer, and each
step takes a batch of random rows out of it, at the stream's pace."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from clap_core.train.config import load_pretrain_config
from clap_core.train.feed import Feed, ShuffleBuffer, buffer_rows_for, shard_passes, torch_batch, train_feed


def rows(ids) -> dict[str, np.ndarray]:
    """A batch whose every column is a function of the row id, so a row's columns can be checked to travel together."""
    ids = np.asarray(ids, np.int64)
    return {"id": ids, "wave": np.stack([np.full(3, i, np.float32) for i in ids]) if len(ids) else
            np.zeros((0, 3), np.float32)}


def assert_rows_intact(batch):
    assert np.array_equal(batch["wave"], np.repeat(batch["id"][:, None], 3, axis=1).astype(np.float32))


def test_the_buffer_returns_every_row_once_with_its_columns_and_grows_past_its_first_allocation():
    buffer = ShuffleBuffer(np.random.default_rng(0))
    taken = []
    for start in range(0, 1000, 50):  # 50 in, 30 out: the buffer grows to 400 rows, past its first 200
        buffer.add(rows(range(start, start + 50)))
        batch = buffer.take(30)
        assert_rows_intact(batch)
        taken.extend(batch["id"].tolist())
    assert len(buffer) == 400
    rest = buffer.take(400)
    assert_rows_intact(rest)
    assert sorted(taken + rest["id"].tolist()) == list(range(1000)) and len(buffer) == 0
    assert taken != sorted(taken)  # shuffled: not the order they came in
    with pytest.raises(ValueError, match=r"take\(1\) from a buffer of 0 rows"):
        buffer.take(1)
    with pytest.raises(ValueError, match="columns"):
        buffer.add({"id": np.arange(2)})


def test_a_reserved_buffer_never_reallocates_up_to_its_reserve():
    buffer = ShuffleBuffer(np.random.default_rng(0), reserve_rows=100)
    buffer.add(rows(range(10)))
    storage = buffer.columns["wave"]
    for start in range(10, 100, 10):
        buffer.add(rows(range(start, start + 10)))
    assert buffer.columns["wave"] is storage and len(storage) == 100  # a full buffer is never copied to grow
    taken = buffer.take(50)
    buffer.touch(30)  # faults in rows past the highest ever held, never the 50 held now
    assert buffer.touched == 100 and len(buffer) == 50
    assert_rows_intact(taken)
    assert_rows_intact(held := buffer.take(50))
    assert sorted(taken["id"].tolist() + held["id"].tolist()) == list(range(100))
    buffer.add(rows(range(10)))
    buffer.add(rows(range(10, 100)))
    buffer.add(rows(range(100, 101)))
    assert len(buffer.columns["wave"]) == 200 and sorted(buffer.take(101)["id"].tolist()) == list(range(101))


def test_touching_ahead_never_writes_over_buffered_rows():
    buffer = ShuffleBuffer(np.random.default_rng(1), reserve_rows=64)
    buffer.add(rows(range(8)))
    assert buffer.touched == 8
    buffer.touch(16)
    assert buffer.touched == 24
    buffer.add(rows(range(8, 16)))  # into touched rows
    buffer.touch(1000)  # up to the storage's end
    assert buffer.touched == 64
    batch = buffer.take(16)
    assert_rows_intact(batch)
    assert sorted(batch["id"].tolist()) == list(range(16))


def test_without_an_rng_the_buffer_is_first_in_first_out():
    buffer = ShuffleBuffer(None)
    buffer.add(rows(range(5)))
    buffer.add(rows(range(5, 9)))
    assert buffer.take(4)["id"].tolist() == [0, 1, 2, 3]
    batch = buffer.take(4)
    assert batch["id"].tolist() == [4, 5, 6, 7]
    assert_rows_intact(batch)
    assert len(buffer) == 1


class Passes:
    """`passes` for Feed: pass p yields rows p*1000 .. p*1000 + rows_per_pass - 1 in batches; pass `stall_pass`
    waits for `release` before its first batch (a new epoch's stream that takes long to start)."""

    def __init__(self, rows_per_pass: int, batch: int, stall_pass: int | None = None):
        self.rows_per_pass, self.batch, self.stall_pass = rows_per_pass, batch, stall_pass
        self.release = threading.Event()
        self.started = 0

    def __call__(self):
        p, self.started = self.started, self.started + 1
        if p == self.stall_pass:
            assert self.release.wait(10)
        for start in range(0, self.rows_per_pass, self.batch):
            yield rows(range(p * 1000 + start, p * 1000 + min(start + self.batch, self.rows_per_pass)))


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_rows_stream_through_a_bounded_buffer_each_once_and_shuffled_across_passes():
    passes = Passes(rows_per_pass=100, batch=8)
    feed = Feed(passes, batch_size=8, buffer_rows=32, seed=1)
    wait_until(lambda: feed.rows_read >= 32)  # read before any `next`: the stream starts with the feed
    time.sleep(0.05)
    assert 32 <= feed.rows_read <= 32 + 2 * 8  # then the reader waits: a full buffer (+ the batch taken ahead)
    seen = []
    for step in range(60):  # 480 rows: four passes and more
        batch, waited = next(feed)
        assert_rows_intact(batch)
        assert len(batch["id"]) == 8
        seen.extend(batch["id"].tolist())
        assert feed.rows_read - len(seen) <= 32 + 2 * 8  # one batch in for one out: never more rows in hand
    assert len(seen) == len(set(seen))  # no row twice
    first_three_passes = {p * 1000 + i for p in range(3) for i in range(100)}
    assert first_three_passes <= set(seen)  # nothing stays behind: every row of the early passes came out
    displacement = np.abs(np.argsort(seen) - np.arange(len(seen))).mean()  # position out vs in (rows are read in id order)
    assert displacement > 4 and seen != sorted(seen)
    assert any(b // 1000 != a // 1000 for a, b in zip(seen[::8], seen[7::8]))  # batches mix rows of two passes
    feed.close()


def test_the_reader_gathers_the_next_batch_ahead():
    feed = Feed(Passes(rows_per_pass=100, batch=8), batch_size=8, buffer_rows=32, seed=3)
    wait_until(lambda: feed.ready is not None and feed.rows_read >= 32)  # the buffer fills meanwhile
    ahead = feed.ready["id"].copy()
    batch, waited = next(feed)
    assert np.array_equal(batch["id"], ahead)  # the loop got the gathered batch
    wait_until(lambda: feed.ready is not None)  # and the reader gathers the next one
    feed.close()


def test_the_batches_taken_ahead_go_to_the_device_in_the_reader_thread():
    threads = []

    def to_device(batch):
        threads.append(threading.current_thread().name)
        return {k: torch.from_numpy(v) for k, v in batch.items()}
    feed = Feed(Passes(rows_per_pass=100, batch=8), batch_size=8, buffer_rows=32, to_device=to_device, seed=4)
    wait_until(lambda: feed.ready is not None)
    seen = []
    for _ in range(20):
        batch, waited = next(feed)
        assert isinstance(batch["id"], torch.Tensor)
        seen.extend(batch["id"].tolist())
        time.sleep(0.01)  # a step: the reader prepares the next batch meanwhile
    assert len(seen) == len(set(seen)) == 160
    assert threads.count("clap-feed-reader") >= 18  # the loop's thread converted at most the odd one
    feed.close()


def test_the_loop_is_served_from_the_buffer_while_a_new_pass_starts():
    passes = Passes(rows_per_pass=64, batch=8, stall_pass=1)
    feed = Feed(passes, batch_size=8, buffer_rows=32, seed=2)
    while passes.started < 2:  # take until the reader has read the first pass and waits for the second's start
        next(feed)
        time.sleep(0.05)  # the reader refills after each take
    assert len(feed.buffer) >= 24
    stalled = []
    for _ in range(3):  # the stream gives nothing now, yet the buffered rows are: three batches without waiting
        start = time.perf_counter()
        batch, waited = next(feed)
        stalled.append(time.perf_counter() - start)
        assert all(i < 1000 for i in batch["id"])
    assert max(stalled) < 0.5 and not passes.release.is_set()
    passes.release.set()
    later = np.concatenate([next(feed)[0]["id"] for _ in range(4)])  # the second pass flows in again
    assert (later >= 1000).any()
    feed.close()


def test_buffer_zero_streams_the_batches_in_order():
    feed = Feed(Passes(rows_per_pass=24, batch=8), batch_size=8, buffer_rows=0)
    assert [next(feed)[0]["id"].tolist() for _ in range(4)] == [
        list(range(8)), list(range(8, 16)), list(range(16, 24)), list(range(1000, 1008))]
    feed.close()


def test_a_short_pass_and_a_stream_error_reach_the_loop():
    feed = Feed(Passes(rows_per_pass=5, batch=8), batch_size=8, buffer_rows=0)
    with pytest.raises(ValueError, match=r"fewer than train.batch_size=8 rows per worker \(5 in a pass\)"):
        next(feed)

    def broken():
        yield rows(range(8))
        raise OSError("the shard's read failed")
    feed = Feed(broken, batch_size=4, buffer_rows=0)
    wait_until(lambda: feed.error is not None)
    with pytest.raises(OSError, match="the shard's read failed"):  # raised even though rows are still buffered
        next(feed)
    with pytest.raises(OSError):
        next(feed)


def test_the_loop_waits_only_for_what_is_not_there_yet():
    def slow():
        time.sleep(0.4)
        yield rows(range(8))
        yield rows(range(8, 16))
    feed = Feed(slow, batch_size=8, buffer_rows=0)
    batch, waited = next(feed)
    assert 0.2 < waited < 5
    time.sleep(0.1)  # the reader has added the second batch meanwhile
    batch, waited = next(feed)
    assert batch["id"].tolist() == list(range(8, 16)) and waited < 0.05
    feed.close()


def test_close_stops_a_reader_that_waits_on_a_full_buffer():
    feed = Feed(Passes(rows_per_pass=100, batch=8), batch_size=8, buffer_rows=16)
    wait_until(lambda: feed.rows_read >= 16)
    feed.close()
    feed.thread.join(5)
    assert not feed.thread.is_alive()


class FakeShard:
    """What `ray.train.get_dataset_shard` returns, as far as the feed uses it: one pass per iter_batches call."""

    def __init__(self, batches: list):
        self.batches = batches
        self.passes = []  # the kwargs of each pass

    def iter_batches(self, **kwargs):
        self.passes.append(kwargs)
        return iter(self.batches)


def test_train_feed_reads_numpy_passes_of_the_shard_and_hands_torch_tensors():
    cfg = load_pretrain_config(None, ["train.batch_size=4", "data.shuffle_buffer=0", "data.prefetch_batches=2"])
    shard = FakeShard([keyed_rows(range(4), range(4)), keyed_rows(range(4, 8), range(4, 8))])
    feed = train_feed(shard, cfg, torch.device("cpu"), train_rows=8)
    batches = [next(feed)[0] for _ in range(3)]
    assert [b["id"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert batches[0]["wave"].dtype == torch.float32 and batches[0]["id"].dtype == torch.int64
    assert shard.passes[0] == {"batch_size": 4, "batch_format": "numpy", "prefetch_batches": 2}
    feed.close()
    assert torch_batch("cpu")({"x": np.ones((2, 3), np.float32)})["x"].shape == (2, 3)
    assert list(shard_passes(FakeShard([rows(range(2))]), 2, 1)())[0]["id"].tolist() == [0, 1]


def keyed_rows(ids, keys) -> dict[str, np.ndarray]:
    return {**rows(ids), "clip_key": np.asarray(keys, np.int64)}


def test_a_keyed_take_never_puts_one_clip_twice_in_a_batch():
    """A 40-clip split read again and again: ~10 copies of each clip held at once. Every take of 32 holds 32
    distinct clips; plain random takes from the same stream do not (so the check can fail)."""
    def takes(key):
        buffer, rng, ids = ShuffleBuffer(np.random.default_rng(5), key=key), np.random.default_rng(6), iter(range(10**6))
        buffer.add(keyed_rows([next(ids) for _ in range(400)], rng.integers(0, 40, 400)))
        for _ in range(60):  # a batch of the stream in for each batch out
            yield buffer.take(32)
            buffer.add(keyed_rows([next(ids) for _ in range(32)], rng.integers(0, 40, 32)))

    for batch in takes("clip_key"):
        assert_rows_intact(batch)
        assert len(set(batch["clip_key"].tolist())) == 32
    assert min(len(set(b["clip_key"].tolist())) for b in takes(None)) < 32


def test_a_keyed_take_from_fewer_clips_than_a_batch_takes_each_then_repeats():
    buffer = ShuffleBuffer(np.random.default_rng(7), key="clip_key")
    buffer.add(keyed_rows(range(20), [i % 5 for i in range(20)]))  # 5 clips, 4 copies each
    batch = buffer.take(8)
    assert_rows_intact(batch)
    assert sorted(set(batch["clip_key"].tolist())) == [0, 1, 2, 3, 4] and len(buffer) == 12
    rest = buffer.take(12)
    assert sorted(batch["id"].tolist() + rest["id"].tolist()) == list(range(20))


def test_the_feed_of_a_small_split_repeated_keeps_its_clips_apart():
    """What the demo's run reads: a split smaller than the buffer, repeated within one Ray Data epoch in blocks
    of random order (epoch_passes, randomize_block_order). No batch of 32 holds a clip twice."""
    rng = np.random.default_rng(8)

    def epoch():
        blocks = [np.arange(s, s + 30) for s in range(0, 90, 30)] * 12  # 90 clips, 12 passes
        stream = np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])
        for s in range(0, len(stream), 32):
            yield keyed_rows(stream[s:s + 32], stream[s:s + 32] % 90)

    feed = Feed(epoch, batch_size=32, buffer_rows=1024, seed=9, key="clip_key")
    for _, (batch, _) in zip(range(100), feed):
        assert len(set(batch["clip_key"].tolist())) == 32
    feed.close()


def test_a_worker_buffers_at_most_its_share_of_the_split():
    assert buffer_rows_for(1024, train_rows=90, num_workers=1) == 180  # two passes of the worker's share
    assert buffer_rows_for(1024, train_rows=657, num_workers=2) == 658
    assert buffer_rows_for(1024, train_rows=10**6, num_workers=8) == 1024
    assert buffer_rows_for(0, train_rows=10**6, num_workers=1) == 0  # no shuffle asked: none
    cfg = load_pretrain_config(None, ["train.batch_size=4", "scaling.num_workers=2"])
    feed = train_feed(FakeShard([keyed_rows(range(4), range(4))]), cfg, torch.device("cpu"), train_rows=9)
    assert feed.buffer_rows == 10 and feed.buffer.key == "clip_key"
    feed.close()
