"""What a `clap pretrain` run shows on the console: rank 0's step and validation lines, printed once by the driver,
and one line per checkpoint Ray Train has registered.

Workers' output is not forwarded to the console (pipelines.console.init_ray), so rank 0 hands each line
(clap_core.train.run_log) to the driver through a Ray queue: `StepLines.sink` is the callable it emits them with.
Lines do not go through ray.train.report: a report blocks the worker until Ray Train's controller polls it
(every 2 s), so the training loop reports only with its checkpoints.
"""
from __future__ import annotations

import queue
import threading

from pipelines import console


class StepLines:
    """The driver's end of the lines (see the module docstring): `sink` is what rank 0 emits them with (None:
    inactive, rank 0 prints them on its own stdout, which shows or is meant to stay hidden); `callbacks` adds
    "checkpoint N saved" once Ray Train's controller has registered checkpoint N, from when on a lost worker
    group restarts from it.

        lines = StepLines()
        trainer = TorchTrainer(..., train_loop_config={..., "step_lines": lines.sink},
                               run_config=RunConfig(..., callbacks=lines.callbacks))
        with lines:
            trainer.fit()
    """

    def __init__(self):
        self.sink, self.queue, self.callbacks = None, None, []
        if not console.workers_silent():  # rank 0's own stdout reaches the console
            return
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # a tiny actor (no CPU taken from the workers) on the driver's node: on another node, losing that node
        # would lose the lines (and end the run) although Ray Train restores the workers
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.sink = QueueLines(self.queue)
        self.callbacks = [_checkpoint_lines_callback(self.queue)]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._print_lines, name="clap-step-lines", daemon=True)

    def __enter__(self) -> StepLines:
        if self.queue is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.queue is None:
            return
        self.done.set()
        self.thread.join()
        while True:  # lines emitted just before fit() returned
            try:
                print(self.queue.get_nowait(), flush=True)
            except Exception:  # ray.util.queue.Empty
                break
        self.queue.shutdown()

    def _print_lines(self) -> None:
        from ray.util.queue import Empty

        while not self.done.is_set():
            try:
                print(self.queue.get(timeout=0.5), flush=True)
            except (Empty, queue.Empty):
                continue


def checkpoint_line(step: int, path: str) -> str:
    return f"checkpoint {step} saved: {path}"


def _checkpoint_lines_callback(lines_queue):
    """A ray.train.UserCallback (it runs in Ray Train's controller): each registered checkpoint -> one line."""
    from ray.train import UserCallback

    class CheckpointLines(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                step = (metrics[0] if metrics else {}).get("step", "?")
                lines_queue.put(checkpoint_line(step, checkpoint.path))

    return CheckpointLines()


class QueueLines:
    """The callable rank 0 emits its console lines with (picklable: it travels in the train loop config): each
    line into the driver's queue, or onto the worker's own stdout (Ray's worker log) when the queue is gone."""

    def __init__(self, lines_queue):
        self.queue = lines_queue

    def __call__(self, line: str) -> None:
        try:
            self.queue.put(line, timeout=5)
        except Exception:  # the driver (and its queue actor) went away: the line still lands in the worker's log
            from clap_core.train.run_log import console_line

            console_line(line)
