"""What a pretraining run reports: console lines, TensorBoard, the metric history, metrics.json and curves.png.

    logger = RunLogger(run_uri, state, enabled=rank == 0)   # history/evals continue those of the checkpoint;
                                                # emit=callable sends rank 0's lines elsewhere than stdout
    logger.interval(entry, total_steps)        # "step 10/1000  loss 3.9  temperature 0.0700  lr ..."
    logger.evaluation(step, {"val/t2a/R@1": ...})
    logger.sync()                               # flush TensorBoard (and upload it when the run is on s3://)
    logger.write_summary(folder, state, cfg_hash)   # metrics.json + curves.png, rank 0 at the end

Only rank 0 writes (enabled); every rank keeps the same history so any of them could checkpoint it.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from clap_core import storage
from clap_core.storage import resolve_fs
from clap_core.train.engine import TrainState

SUMMARY_FILE = "metrics.json"  # RUN/metrics.json: final step, config hash, resumes, history, evals
CURVES_FILE = "curves.png"  # RUN/curves.png: training loss and validation t2a R@1 over the steps
TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/: the event files


def console_line(text: str) -> None:
    """One line on the worker's stdout, which Ray forwards to the driver once. (Ray Train patches print() in
    workers to log *and* echo each line, which printed every step line twice.)"""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def step_line(entry: dict, total: int) -> str:
    """The console line of one history entry: "step 10/1000  loss 3.9  temperature 0.0700  lr ...  ETA 5m20s"."""
    temps = f"temperature {entry['temperature']:.4f}"
    if "temperature_text" in entry:
        temps = f"temperature a2t {entry['temperature']:.4f} t2a {entry['temperature_text']:.4f}"
    line = (f"step {entry['step']}/{total}  loss {entry['loss']:.4f}  {temps}  lr {entry['lr']:.2e}  "
            f"{entry['samples_per_s']:.1f} samples/s  data-wait {entry['data_wait_share']:.0%}")
    if "eta_s" in entry and entry["step"] < total:
        line += f"  ETA {duration(entry['eta_s'])}"
    return line


def duration(seconds: float) -> str:
    """42s, 5m20s, 2h05m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def validation_line(step: int, metrics: dict[str, float]) -> str:
    """The console line of a validation ({'val/t2a/R@1': ...})."""
    shown = "  ".join(f"{k} {metrics[f'val/{k}']:.3f}" for k in ("t2a/R@1", "t2a/R@5", "a2t/R@1", "t2a/mAP@10"))
    return f"step {step}  validation  {shown}"


class RunLogger:
    """Rank 0's TensorBoard writer, console lines and metric history (the history survives restarts)."""

    def __init__(self, run_uri: str, state: TrainState, enabled: bool, emit=console_line):
        self.enabled = enabled
        self.emit = emit  # where rank 0's console lines go: its stdout, or a callable that hands them to the driver
        self.run_uri = run_uri
        fs, run_path = resolve_fs(run_uri)
        self.local = isinstance(fs, pafs.LocalFileSystem)
        # remote runs log into a local folder and upload it at checkpoints and at the end
        self.tb_dir = (Path(run_path) if self.local else Path(tempfile.mkdtemp())) / TENSORBOARD_DIR
        self.history = state.history  # the state's own lists: a checkpoint saves what was logged
        self.evals = state.evals
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=state.step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def interval(self, entry: dict, total: int) -> None:
        """Record one history entry (step, loss, temperature(s), lr, samples_per_s, data_wait_share)."""
        self.history.append(entry)
        if self.enabled:
            self.emit(step_line(entry, total))

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """Record validation metrics ({'val/t2a/R@1': ...}) of a step."""
        self.evals.append({"step": step, **{k.removeprefix("val/"): v for k, v in metrics.items()}})
        self.scalars(step, metrics)
        if self.enabled:
            self.emit(validation_line(step, metrics))

    def sync(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            if not self.local:
                storage.upload(self.tb_dir, storage.join(self.run_uri, TENSORBOARD_DIR))

    def write_summary(self, folder: str | Path, state: TrainState, cfg_hash: str) -> list[str]:
        """metrics.json and curves.png into a local folder; returns the file names written."""
        summary = {"step": state.step, "config_hash": cfg_hash, "resumes": state.resumes,
                   "history": self.history, "evals": self.evals,
                   "final_eval": self.evals[-1] if self.evals else None}
        Path(folder, SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        from clap_core.eval.plots import plot_curves  # matplotlib: imported when a curve is drawn, not by each worker

        plot_curves(self.history, self.evals, Path(folder) / CURVES_FILE)
        return [SUMMARY_FILE, CURVES_FILE]


class StepWindow:
    """Sums over the steps since the last console line, on this rank: loss, seconds waited for data, wall time."""

    def __init__(self):
        self.loss = self.wait = self.seconds = 0.0
        self.steps = 0
        self.tick = time.perf_counter()

    def add(self, loss: float, waited: float) -> None:
        now = time.perf_counter()
        self.loss += loss
        self.wait += waited
        self.seconds += now - self.tick
        self.steps += 1
        self.tick = now

    def restart_clock(self) -> None:
        """Time spent since the last step (evaluation, checkpoint) is not step time."""
        self.tick = time.perf_counter()
