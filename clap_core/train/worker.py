"""One training worker's state and the steps of its loop that need no Ray (pipelines/pretrain_worker.py runs the loop).

    ctx = WorkerContext(cfg=cfg, model_cfg=model_cfg, engine=engine, loss_fn=loss_fn, state=state, ...)
    metrics = log_interval(ctx, window)        # mean over ranks -> history, console, TensorBoard
    check_bad_rows(cfg, run_uri, train_rows)   # past data.max_bad_row_fraction undecodable rows: BadRowsError
    maybe_inject_fault(ctx)                    # train.kill_worker_at_step: the last rank dies once (tests)
    export_run(ctx)                            # final/, engine_probe.npz, metrics.json, curves.png

The run folder: `final/` (save_pretrained), `engine_probe.npz`, `metrics.json` + `curves.png` +
`tensorboard/` (run_log.py), `checkpoint_<step>/` (engine.py's format, placed by Ray Train), `_rejects/`
(undecodable training rows) and `.fault_injected` (the test hook fired).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from clap_core import storage
from clap_core.config import config_hash
from clap_core.data.rejects import REJECTS_DIR, count_reject_rows
from clap_core.model.clap import ClapModel
from clap_core.model.config import ClapModelConfig
from clap_core.train.config import PretrainConfig
from clap_core.train.engine import TrainState, consolidated_state_dict
from clap_core.train.run_log import RunLogger, StepWindow, console_line
from clap_core.train.validation import ValidSet, engine_probe

EXPORT_DIR = "final"  # RUN/final/: the consolidated `save_pretrained` model
PROBE_FILE = "engine_probe.npz"  # RUN/engine_probe.npz: the engine's embeddings of a few validation pairs
FAULT_MARKER = ".fault_injected"  # RUN/.fault_injected: train.kill_worker_at_step fired (once per run folder)


@dataclass
class WorkerContext:
    """Everything one training worker holds, built once at the start of train_fn_per_worker."""
    cfg: PretrainConfig  # the job's config (train, deepspeed, scaling, data)
    model_cfg: ClapModelConfig  # the resolved architecture, which final/ is exported with
    engine: Any  # the DeepSpeed engine; engine.module is the ClapModel
    loss_fn: torch.nn.Module  # clap_core.train.loss.build_loss for this rank
    state: TrainState  # step and metric history, restored from the latest checkpoint on resume
    logger: RunLogger  # console lines and TensorBoard (rank 0), history (every rank)
    valid: ValidSet | None  # the validation split (None: no data.valid_split shards)
    rank: int  # this worker's rank in [0, world)
    world: int  # number of training workers
    device: torch.device  # cuda:<local rank> or cpu
    run_uri: str  # the run folder: absolute path or s3:// prefix
    train_rows: int = 0  # rows of the training split (bounds the undecodable ones)


def all_mean(values: list[float], device: torch.device, world: int) -> list[float]:
    """The mean of each value over the ranks (all ranks must call)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return (t / world).tolist()


@torch.no_grad()
def temperatures(model: ClapModel) -> dict[str, float]:
    """{'temperature': audio->text} plus 'temperature_text' when the text->audio one is learned separately."""
    scale_audio, scale_text = model.logit_scales()
    out = {"temperature": float(1.0 / scale_audio.float())}
    if model.config.temperature.per_modality:
        out["temperature_text"] = float(1.0 / scale_text.float())
    return out


def log_interval(ctx: WorkerContext, window: StepWindow) -> dict[str, float]:
    """Mean loss, throughput and data wait of the window over all ranks into the history, console and
    TensorBoard; returns them as {'train/loss': ...} for ray.train.report (all ranks must call)."""
    loss, wait, seconds = all_mean([window.loss / window.steps, window.wait, window.seconds], ctx.device, ctx.world)
    entry = {"step": ctx.state.step, "loss": loss, **temperatures(ctx.engine.module), "lr": ctx.engine.get_lr()[0],
             "samples_per_s": window.steps * ctx.cfg.train.batch_size * ctx.world / max(seconds, 1e-9),
             "data_wait_share": wait / max(seconds, 1e-9),
             # at this interval's pace (checkpoint and validation time left out)
             "eta_s": (ctx.cfg.train.steps - ctx.state.step) * seconds / window.steps}
    metrics = {f"train/{k}": v for k, v in entry.items() if k not in ("step", "eta_s")}
    ctx.logger.scalars(ctx.state.step, metrics)
    ctx.logger.interval(entry, ctx.cfg.train.steps)
    return metrics


class BadRowsError(ValueError):
    """Too many training rows do not decode: the data is broken, not the run."""


def check_bad_rows(cfg: PretrainConfig, run_uri: str, train_rows: int) -> None:
    """Undecodable training rows are skipped and recorded in RUN/_rejects/ (shard and id); past
    data.max_bad_row_fraction of the training rows (at least one row is allowed) the run fails."""
    allowed = max(1, int(cfg.data.max_bad_row_fraction * train_rows))
    bad = count_reject_rows(storage.join(run_uri, REJECTS_DIR))
    if bad > allowed:
        raise BadRowsError(f"{bad} of {train_rows} training rows do not decode (more than "
                           f"data.max_bad_row_fraction={cfg.data.max_bad_row_fraction}); shard and id of each are in "
                           f"{storage.join(run_uri, REJECTS_DIR)}")


FAULT_DELAY_S = 5.0  # the dying rank outlives the controller's poll of the last checkpoint (Ray Train: every 2 s)


def maybe_inject_fault(ctx: WorkerContext) -> None:
    """Test hook: the last rank dies (no cleanup, like a lost node) at train.kill_worker_at_step, once per run
    folder (the marker file keeps a restarted or re-run job from dying again).

    It dies FAULT_DELAY_S after reaching the step, as a node lost a moment later would: Ray Train registers a
    reported checkpoint when its controller next polls the workers, and a worker group lost before that poll
    restarts from the checkpoint before it, which would make what the tests restore from a matter of timing."""
    if ctx.cfg.train.kill_worker_at_step != ctx.state.step or ctx.rank != ctx.world - 1:
        return
    marker = storage.join(ctx.run_uri, FAULT_MARKER)
    if storage.exists(marker):
        return
    storage.put_atomic(marker, f"worker {ctx.rank} killed at step {ctx.state.step}\n".encode())
    time.sleep(FAULT_DELAY_S)
    os._exit(1)


def export_run(ctx: WorkerContext) -> None:
    """Consolidated `save_pretrained` export, probe embeddings of the engine, metrics.json and the PNG into the
    run folder. All ranks must call (ZeRO-3 gathers the weights); rank 0 writes."""
    weights = consolidated_state_dict(ctx.engine)
    probe = engine_probe(ctx.engine.module, ctx.valid, ctx.device) if ctx.valid is not None else None
    if ctx.rank != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        export = ClapModel(ctx.model_cfg, tokenizer=ctx.engine.module.tokenizer)
        export.load_state_dict(weights)
        export.save_pretrained(Path(tmp) / EXPORT_DIR)
        names = [EXPORT_DIR]
        if probe is not None:
            np.savez(Path(tmp) / PROBE_FILE, **probe)
            names.append(PROBE_FILE)
        names += ctx.logger.write_summary(tmp, ctx.state, config_hash(ctx.cfg))
        for name in names:
            storage.upload(Path(tmp, name), storage.join(ctx.run_uri, name))
    ctx.logger.sync()
    console_line(f"exported {ctx.run_uri.rstrip('/')}/{EXPORT_DIR} (step {ctx.state.step})")
