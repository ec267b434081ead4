"""The worker side of `clap pretrain`: what each Ray Train worker runs (pipelines/pretrain.py is the driver).

    train_fn_per_worker(config, feed)  # the model in a DeepSpeed engine, resume, train_loop, export_run
    train_loop(ctx, feed)          # steps, console lines, validation, checkpoints (every rank reports)

Only the workers import this module: it brings torch, the model classes and DeepSpeed (about 7 s of CPU per
process on a 2-core machine). pipelines.pretrain hands Ray Train a function that imports it when it runs, so
Ray Train's controller, which unpickles that function, imports only the light driver module.
"""
from __future__ import annotations

import tempfile
from typing import Iterator

import ray.train
import ray.train.torch
import torch

from clap_core.config import from_dict
from clap_core.model.clap import ClapModel
from clap_core.model.config import ClapModelConfig
from clap_core.train.config import PretrainConfig
from clap_core.train.engine import TrainState, init_engine, read_checkpoint, train_step, write_checkpoint
from clap_core.train.loss import build_loss
from clap_core.train.run_log import RunLogger, StepWindow, console_line
from clap_core.train.validation import ValidSet, evaluate
from clap_core.train.worker import (
    WorkerContext,
    check_bad_rows,
    export_run,
    log_interval,
    maybe_inject_fault,
)
from pipelines.pretrain import SetupError


def train_fn_per_worker(config: dict, feed: Iterator[tuple[dict, float]] | None) -> None:
    """`feed`: the training batches, already asked for (pipelines.pretrain starts them before importing this
    module: clap_core.train.feed.Feed); None for --export-only, which trains nothing."""
    cfg = from_dict(PretrainConfig, config["pretrain"])
    model_cfg = from_dict(ClapModelConfig, config["model"])
    run_uri, export_only = config["run_uri"], config.get("export_only", False)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    try:  # deterministic setup: no I/O here, so an error is a verdict on the config (not retried)
        engine = init_engine(ClapModel(model_cfg).to(device), cfg, use_gpu=device.type == "cuda")
        loss_fn = build_loss(model_cfg.loss, cfg.train.local_loss, rank, world)
    except Exception as e:
        raise SetupError(f"rank {rank} could not build the model/DeepSpeed engine/loss: "
                         f"{type(e).__name__}: {e}") from e
    torch.manual_seed(cfg.train.seed + 1000 * rank)  # different dropout/crops per rank
    state = restore(engine)
    if export_only and not state.resumes:
        raise FileNotFoundError(f"--export-only: {run_uri} holds no checkpoint to export")
    valid_shard = ray.train.get_dataset_shard("valid") if config.get("has_valid") else None
    valid = None if valid_shard is None else ValidSet(
        valid_shard.iter_batches(batch_size=256, batch_format="numpy"), model_cfg, cfg.data.max_valid_clips)
    emit = config.get("step_lines") or console_line  # rank 0's lines: the driver's queue, else its own stdout
    ctx = WorkerContext(cfg=cfg, model_cfg=model_cfg, engine=engine, loss_fn=loss_fn, state=state,
                        logger=RunLogger(run_uri, state, enabled=rank == 0, emit=emit), valid=valid, rank=rank,
                        world=world, device=device, run_uri=run_uri, train_rows=config.get("train_rows", 0))

    if not export_only and state.step < cfg.train.steps:
        train_loop(ctx, feed)
    export_run(ctx)  # final/ (consolidated weights), engine_probe.npz, metrics.json, curves.png


def train_loop(ctx: WorkerContext, batches: Iterator[tuple[dict, float]]) -> None:
    train = ctx.cfg.train
    ctx.engine.train()
    window = StepWindow()
    while ctx.state.step < train.steps:
        batch, waited = next(batches)
        loss = train_step(ctx.engine, ctx.loss_fn, batch, ctx.cfg)
        ctx.state.step += 1
        step = ctx.state.step
        window.add(float(loss), waited)
        maybe_inject_fault(ctx)
        last = step == train.steps
        metrics: dict[str, float] = {}
        if step % train.log_every == 0 or last:
            check_bad_rows(ctx.cfg, ctx.run_uri, ctx.train_rows)
            metrics = log_interval(ctx, window)
            window = StepWindow()
        if ctx.valid is not None and ((train.eval_every and step % train.eval_every == 0) or last):
            eval_metrics = evaluate(ctx.engine.module, ctx.valid, train.eval_batch_size, ctx.rank, ctx.world,
                                    ctx.device)
            ctx.logger.evaluation(step, eval_metrics)
            metrics.update(eval_metrics)
        if step % train.checkpoint_every == 0 or last:  # the only reports: each blocks until the controller polls
            ctx.logger.sync()
            save_checkpoint(ctx, {"step": step, **metrics})
        window.restart_clock()  # checkpoint and eval time is not step time


def save_checkpoint(ctx: WorkerContext, metrics: dict) -> None:
    """Every rank writes its DeepSpeed shards, then reports them; Ray Train merges them into one folder."""
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(ctx.engine, tmp, ctx.state, ctx.rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{ctx.state.step:08d}")


def restore(engine) -> TrainState:
    """The latest checkpoint of the run (a restarted worker group, or the same command run again), if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as folder:
        return read_checkpoint(engine, folder)
