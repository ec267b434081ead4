"""The DeepSpeed engine of one training worker: its config, one optimizer step, its checkpoints, its weights.

    engine = init_engine(ClapModel(model_cfg).to(device), cfg, use_gpu)   # ZeRO stage, precision from cfg
    loss = train_step(engine, loss_fn, batch, cfg)     # forward + backward (plain or gradient cache) + step
    write_checkpoint(engine, folder, state, rank)      # every rank its shards; rank 0 train_state.json
    state = read_checkpoint(engine, folder)            # resume / --export-only, nothing unpickled
    weights = consolidated_state_dict(engine)          # full fp32 weights on every rank (ZeRO-3 gathers)

This module owns the checkpoint folder format: `<folder>/deepspeed/` (DeepSpeed's files, tag DS_TAG) and
`<folder>/train_state.json` (TrainState). DeepSpeed is imported inside the functions: clap_core imports
without it. Every rank must call write_checkpoint and consolidated_state_dict (collective operations).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clap_core.model.clap import ClapModel
from clap_core.train.batching import trim_padding
from clap_core.train.config import PretrainConfig
from clap_core.train.gradcache import grad_cache_step, plain_step
from clap_core.train.optim import build_optimizer, warmup_cosine
from clap_core.train.safe_load import load_deepspeed_checkpoint

DS_TAG = "deepspeed"  # DeepSpeed checkpoint tag (sub-folder) inside each checkpoint folder
STATE_FILE = "train_state.json"  # TrainState: what a resumed run continues from


@dataclass
class TrainState:
    """Progress of a run, saved with every checkpoint (train_state.json, keys in this order)."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # kept for the file format: the run is ordered by `step` alone (never advanced)
    history: list[dict] = field(default_factory=list)  # one entry per console line: step, loss, temperature, lr...
    evals: list[dict] = field(default_factory=list)  # one entry per validation: step and retrieval metrics
    resumes: list[int] = field(default_factory=list)  # the step of each checkpoint this run was resumed from


def deepspeed_config(cfg: PretrainConfig, use_gpu: bool) -> dict:
    ds, train = cfg.deepspeed, cfg.train
    precision = ("bf16" if use_gpu else "fp32") if ds.precision == "auto" else ds.precision
    cached = train.grad_cache_chunk > 0
    zero: dict[str, Any] = {"stage": ds.zero_stage,
                            # DeepSpeed allows overlap with caller-owned accumulation only from stage 2 on
                            "overlap_comm": ds.overlap_comm and (not cached or ds.zero_stage >= 2)}
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # torch AdamW everywhere (no compiled DeepSpeedCPUAdam needed for offload)
        "zero_force_ds_cpu_optimizer": False,
        # The gradient cache calls backward once per chunk and steps once: the caller owns the boundary.
        "managed_gradient_accumulation": not cached,
    }
    if precision != "fp32":
        # autocast keeps fp32 weights (exported as they are) and the model keeps its STFT in fp32
        config["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[precision]}
    return config


def init_engine(model: ClapModel, cfg: PretrainConfig, use_gpu: bool):
    """The model in a DeepSpeed engine with the AdamW groups and the warmup + cosine schedule of cfg.train."""
    import deepspeed
    import deepspeed.ops

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not use_gpu:
        # The shared-memory allreduce op is compiled on first use (~40 s); gloo does the job on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    train = cfg.train
    optimizer = build_optimizer(model, train.lr, train.weight_decay, train.lr_pretrained, train.betas, train.eps)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, use_gpu),
        lr_scheduler=lambda opt: warmup_cosine(opt, train.warmup_steps, train.steps, train.min_lr_ratio))
    return engine


def train_step(engine, loss_fn: torch.nn.Module, batch: dict, cfg: PretrainConfig) -> torch.Tensor:
    """One optimizer step on a batch of PairBatchTransform rows; returns the (detached) loss of this rank."""
    ids, mask = trim_padding(batch["input_ids"], batch["attention_mask"])
    inputs = {"waves": batch["waves"], "lengths": batch["lengths"], "input_ids": ids, "attention_mask": mask}
    if cfg.train.grad_cache_chunk:
        loss = grad_cache_step(engine, loss_fn, inputs, cfg.train.grad_cache_chunk, engine.backward, engine.module)
    else:
        loss = plain_step(engine, loss_fn, inputs, engine.backward)
    engine.step()
    clamp_temperature(engine)
    return loss


def clamp_temperature(engine) -> None:
    """Clamp the stored log-scale (CLIP); under ZeRO the fp32 master copy is the one the optimizer updates."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    scale = engine.module.logit_scale
    param = scale.log_scale
    if not param.requires_grad:
        return
    if engine.zero_optimization_stage() == 0:
        scale.clamp_()
        return
    full = safe_get_full_fp32_param(param)
    if full is not None and bool((full > scale.max_log_scale).any()):
        safe_set_full_fp32_param(param, full.clamp(max=scale.max_log_scale))


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 module state on every rank (ZeRO-3 gathers its partitions; all ranks must call)."""
    import deepspeed

    params = list(engine.module.parameters())
    enabled = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=enabled):
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def write_checkpoint(engine, folder: str | Path, state: TrainState, rank: int) -> None:
    """This rank's DeepSpeed files into `folder` (every rank must call); rank 0 adds train_state.json."""
    engine.save_checkpoint(str(folder), tag=DS_TAG)
    if rank == 0:
        Path(folder, STATE_FILE).write_text(json.dumps(asdict(state)))


def read_checkpoint(engine, folder: str | Path) -> TrainState:
    """Load a checkpoint folder into the engine (weights_only: a run folder is data, not code) and return its
    TrainState with this resume recorded."""
    load_deepspeed_checkpoint(engine, str(folder), tag=DS_TAG)
    state = TrainState(**json.loads(Path(folder, STATE_FILE).read_text()))
    state.resumes.append(state.step)
    return state
