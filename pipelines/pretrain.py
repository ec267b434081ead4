"""`clap pretrain`: contrastive pretraining on the Parquet shards of `clap preprocess`, Ray Train + DeepSpeed.

    clap pretrain --data SHARDS_DIR_OR_S3 --output RUN_DIR_OR_S3 --model tiny [--config FILE] [key=value ...]
    clap pretrain --data ... --output RUN --model tiny --export-only   # consolidate the latest checkpoint now

The driver builds the Ray Data pipeline (read shards -> decode, crop, tokenize -> per-epoch shuffle,
split across workers) and a `TorchTrainer`; each worker wraps a ClapModel in a DeepSpeed engine (ZeRO
stage from the config) and trains with negatives from the global batch.

The run folder (local or s3://) is the Ray Train run: `<output>/checkpoint_<step>/` (DeepSpeed state of
every rank + train_state.json), `tensorboard/`, `metrics.json`, `curves.png`, and `final/` (the
`save_pretrained` export). Running the same command again with the same --output resumes from its
latest checkpoint; a worker failure restarts the worker group from it (scaling.max_failures).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clap_core import storage
from clap_core.config import config_hash, dump_yaml, from_dict, to_dict
from clap_core.data.shards import count_rows, is_augmented_copy, shard_files
from clap_core.eval.metrics import retrieval_metrics
from clap_core.eval.plots import plot_curves
from clap_core.model.clap import ClapModel
from clap_core.model.config import ClapModelConfig
from clap_core.storage import resolve_fs
from clap_core.train.batching import PairBatchTransform, count_reject_rows, decode_rows, trim_padding
from clap_core.train.config import PretrainConfig, load_pretrain_config, resolve_model_config
from clap_core.train.gradcache import grad_cache_step, plain_step
from clap_core.train.loss import ClipLoss, SigLipLoss
from clap_core.train.optim import build_optimizer, warmup_cosine
from clap_core.train.safe_load import load_deepspeed_checkpoint
from pipelines.console import init_ray

REJECTS_DIR = "_rejects"  # RUN/_rejects/: reject records of training rows that do not decode (shard, id)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain.yaml"
DS_TAG = "deepspeed"  # DeepSpeed checkpoint tag inside each Ray Train checkpoint folder
STATE_FILE = "train_state.json"  # step, epoch, metric history: what a resumed run continues from
FAULT_MARKER = ".fault_injected"
PROBE_CLIPS = 4  # validation pairs whose engine embeddings are saved to check the export

log = logging.getLogger("clap.pretrain")


class SetupError(RuntimeError):
    """A worker failed while building its model, engine or loss: the same config fails the same way on every
    try, so the run stops at once instead of being restarted scaling.max_failures times (see FailFastPolicy)."""


def fail_fast_policy(failure_config):
    """Ray Train's default failure policy, except that a SetupError on any worker is raised at once."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    class FailFastPolicy(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if isinstance(training_failed_error, WorkerGroupError) and any(
                    isinstance(e, SetupError) for e in training_failed_error.worker_failures.values()):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return FailFastPolicy(failure_config)


# ---------------------------------------------------------------------------------------------
# storage: local paths and s3:// behind one pyarrow filesystem (clap_core.storage.resolve_fs)


# ---------------------------------------------------------------------------------------------
# DeepSpeed


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


# ---------------------------------------------------------------------------------------------
# evaluation data: the validation split, held by every worker, embedded rank-sharded


class ValidSet:
    """Validation clips (centre-cropped waves) and all their captions, loaded once per worker."""

    def __init__(self, shard, model_cfg: ClapModelConfig, limit: int):
        audio, captions = [], []
        for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
            for i in range(len(batch["audio"])):  # one row per source clip: augmented copies would cap R@1
                if is_augmented_copy({"id": batch["id"][i], "augment": batch["augment"][i]}):
                    continue
                audio.append(batch["audio"][i])
                c = batch["captions"][i]
                captions.append(list(c) if c is not None and len(c) else [batch["caption"][i]])
        audio, captions = audio[:limit], captions[:limit]
        transform = PairBatchTransform.for_model(model_cfg, training=False)
        self.waves, self.lengths, failures = decode_rows(audio, transform.clip_samples, None)  # (N, S), (N,)
        captions = [c for i, c in enumerate(captions) if i not in failures]  # bad validation rows are left out
        self.texts = [c for caps in captions for c in caps]  # (Nt,)
        self.text_to_audio = np.array([i for i, caps in enumerate(captions) for _ in caps])  # (Nt,)
        self.tokens = transform.tokenize(self.texts)
        self.main_caption_rows = np.cumsum([0] + [len(caps) for caps in captions[:-1]])  # first caption of each clip

    def __len__(self) -> int:
        return len(self.waves)


def _rank_rows(n: int, rank: int, world: int) -> np.ndarray:
    """Rows rank, rank+W, ... padded (repeating row 0) to ceil(n/W) so every rank runs the same forwards."""
    per_rank = -(-n // world)
    rows = np.arange(rank, per_rank * world, world)
    return np.where(rows < n, rows, 0)


def _gather_rows(local: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Inverse of _rank_rows: (ceil(n/W), D) per rank -> (n, D) in row order."""
    if world == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, local.shape[-1])[:n]  # row r*... interleaved back


@torch.no_grad()
def embed_valid(model: ClapModel, valid: ValidSet, batch_size: int, rank: int, world: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Na, D) audio and (Nt, D) text embeddings of the validation set, work split across ranks."""
    audio_rows = _rank_rows(len(valid), rank, world)
    text_rows = _rank_rows(len(valid.texts), rank, world)
    audio, text = [], []
    for i in range(0, len(audio_rows), batch_size):
        rows = audio_rows[i:i + batch_size]
        audio.append(model.encode_audio(torch.from_numpy(valid.waves[rows]).to(device),
                                        lengths=torch.from_numpy(valid.lengths[rows]).to(device)).float())
    for i in range(0, len(text_rows), batch_size):
        rows = text_rows[i:i + batch_size]
        ids, mask = trim_padding(valid.tokens["input_ids"][rows], valid.tokens["attention_mask"][rows])
        text.append(model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).float())
    return (_gather_rows(torch.cat(audio), len(valid), world).cpu(),
            _gather_rows(torch.cat(text), len(valid.texts), world).cpu())


def evaluate(engine, valid: ValidSet, cfg: PretrainConfig, rank: int, world: int, device: torch.device) -> dict:
    model = engine.module
    model.eval()
    try:
        audio, text = embed_valid(model, valid, cfg.train.eval_batch_size, rank, world, device)
    finally:
        model.train()
    metrics = retrieval_metrics(audio.numpy(), text.numpy(), valid.text_to_audio)
    return {f"val/{k}": v for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# the training function of every worker


class RunLogger:
    """Rank 0's TensorBoard writer, console lines and metric history (the history survives restarts)."""

    def __init__(self, run_uri: str, state: dict, enabled: bool):
        self.enabled = enabled
        self.run_uri = run_uri
        self.fs, self.run_path = resolve_fs(run_uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        # remote runs log into a local folder and upload it at checkpoints and at the end
        self.tb_dir = Path(self.run_path) / "tensorboard" if self.local else Path(tempfile.mkdtemp()) / "tensorboard"
        self.history: list[dict] = state.get("history", [])
        self.evals: list[dict] = state.get("evals", [])
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=state.get("step", 0) + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def interval(self, entry: dict, total: int) -> None:
        self.history.append(entry)
        if self.enabled:
            temps = f"temperature {entry['temperature']:.4f}"
            if "temperature_text" in entry:
                temps = f"temperature a2t {entry['temperature']:.4f} t2a {entry['temperature_text']:.4f}"
            console_line(f"step {entry['step']}/{total}  loss {entry['loss']:.4f}  {temps}  "
                         f"lr {entry['lr']:.2e}  {entry['samples_per_s']:.1f} samples/s  "
                         f"data-wait {entry['data_wait_share']:.0%}")

    def evaluation(self, step: int, metrics: dict) -> None:
        self.evals.append({"step": step, **{k.removeprefix("val/"): v for k, v in metrics.items()}})
        self.scalars(step, metrics)
        if self.enabled:
            shown = "  ".join(f"{k} {metrics[f'val/{k}']:.3f}" for k in ("t2a/R@1", "t2a/R@5", "a2t/R@1", "t2a/mAP@10"))
            console_line(f"step {step}  validation  {shown}")

    def sync(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            if not self.local:
                storage.upload(self.tb_dir, f"{self.run_uri}/tensorboard")


def console_line(text: str) -> None:
    """One line on the worker's stdout, which Ray forwards to the driver once. (Ray Train patches print() in
    workers to log *and* echo each line, which printed every step line twice.)"""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def maybe_inject_fault(cfg: PretrainConfig, step: int, rank: int, world: int, run_uri: str) -> None:
    """Test hook: the last rank dies (no cleanup, like a lost node) at the configured step, once per run folder."""
    if cfg.train.kill_worker_at_step != step or rank != world - 1:
        return
    marker = storage.join(run_uri, FAULT_MARKER)
    if storage.exists(marker):
        return
    storage.put_atomic(marker, f"worker {rank} killed at step {step}\n".encode())
    os._exit(1)


def save_checkpoint(engine, state: dict, metrics: dict, rank: int) -> None:
    """Every rank writes its DeepSpeed shards, then reports them; Ray Train merges them into one folder."""
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{state['step']:08d}")


def restore(engine) -> dict:
    state = {"step": 0, "epoch": 0, "history": [], "evals": [], "resumes": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return state
    with checkpoint.as_directory() as folder:
        load_deepspeed_checkpoint(engine, folder, tag=DS_TAG)  # weights_only: a run folder is not trusted code
        state = json.loads(Path(folder, STATE_FILE).read_text())
    state["resumes"].append(state["step"])
    return state


def train_batches(shard, cfg: PretrainConfig, device: torch.device):
    """Endless (batch, seconds waited) pairs; each pass over the shard is one epoch with its own shuffle."""
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


def build_loss(model_cfg: ClapModelConfig, cfg: PretrainConfig, rank: int, world: int) -> torch.nn.Module:
    if model_cfg.loss == "siglip":
        return SigLipLoss(rank=rank, world_size=world)
    return ClipLoss(local_loss=cfg.train.local_loss, gather_with_grad=True, rank=rank, world_size=world)


def train_step(engine, loss_fn, batch: dict, cfg: PretrainConfig) -> torch.Tensor:
    ids, mask = trim_padding(batch["input_ids"], batch["attention_mask"])
    inputs = {"waves": batch["waves"], "lengths": batch["lengths"], "input_ids": ids, "attention_mask": mask}
    if cfg.train.grad_cache_chunk:
        loss = grad_cache_step(engine, loss_fn, inputs, cfg.train.grad_cache_chunk, engine.backward, engine.module)
    else:
        loss = plain_step(engine, loss_fn, inputs, engine.backward)
    engine.step()
    clamp_temperature(engine)
    return loss


def all_mean(values: list[float], device: torch.device, world: int) -> list[float]:
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


def train_fn_per_worker(config: dict) -> None:
    cfg = from_dict(PretrainConfig, config["pretrain"])
    model_cfg = from_dict(ClapModelConfig, config["model"])
    run_uri, export_only = config["run_uri"], config.get("export_only", False)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    try:  # deterministic setup: no I/O here, so an error is a verdict on the config (not retried)
        engine = init_engine(ClapModel(model_cfg).to(device), cfg, use_gpu)
        loss_fn = build_loss(model_cfg, cfg, rank, world)
    except Exception as e:
        raise SetupError(f"rank {rank} could not build the model/DeepSpeed engine/loss: "
                         f"{type(e).__name__}: {e}") from e
    torch.manual_seed(cfg.train.seed + 1000 * rank)  # different dropout/crops per rank
    state = restore(engine)
    if export_only and not state["resumes"]:
        raise FileNotFoundError(f"--export-only: {run_uri} holds no checkpoint to export")
    logger = RunLogger(run_uri, state, enabled=rank == 0)
    valid_shard = ray.train.get_dataset_shard("valid") if config.get("has_valid") else None
    valid = ValidSet(valid_shard, model_cfg, cfg.data.max_valid_clips) if valid_shard is not None else None

    if not export_only and state["step"] < cfg.train.steps:
        train_loop(engine, loss_fn, cfg, state, logger, valid, rank, world, device, run_uri,
                   config.get("train_rows", 0))
    finish(engine, model_cfg, cfg, state, logger, valid, rank, world, device, run_uri)


def train_loop(engine, loss_fn, cfg: PretrainConfig, state: dict, logger: RunLogger, valid: ValidSet | None,
               rank: int, world: int, device: torch.device, run_uri: str, train_rows: int = 0) -> None:
    train = cfg.train
    batches = train_batches(ray.train.get_dataset_shard("train"), cfg, device)
    engine.train()
    window = {"loss": 0.0, "wait": 0.0, "time": 0.0, "steps": 0}
    tick = time.perf_counter()
    while state["step"] < train.steps:
        batch, waited = next(batches)
        loss = train_step(engine, loss_fn, batch, cfg)
        state["step"] += 1
        step = state["step"]
        now = time.perf_counter()
        window["loss"] += float(loss)
        window["wait"] += waited
        window["time"] += now - tick
        window["steps"] += 1
        tick = now
        maybe_inject_fault(cfg, step, rank, world, run_uri)
        last = step == train.steps
        metrics: dict[str, Any] = {}
        if step % train.log_every == 0 or last:
            check_bad_rows(cfg, run_uri, train_rows)
            metrics = log_interval(engine, window, cfg, step, logger, device, world)
            window = {"loss": 0.0, "wait": 0.0, "time": 0.0, "steps": 0}
        if valid is not None and ((train.eval_every and step % train.eval_every == 0) or last):
            eval_metrics = evaluate(engine, valid, cfg, rank, world, device)
            logger.evaluation(step, eval_metrics)
            metrics.update(eval_metrics)
        if step % train.checkpoint_every == 0 or last:
            state.update(history=logger.history, evals=logger.evals)
            logger.sync()
            save_checkpoint(engine, state, {"step": step, **metrics}, rank)
        elif metrics:
            ray.train.report({"step": step, **metrics})
        tick = time.perf_counter()  # checkpoint and eval time is not step time


def check_bad_rows(cfg: PretrainConfig, run_uri: str, train_rows: int) -> None:
    """Undecodable training rows are skipped and recorded in RUN/_rejects/ (shard and id); past
    data.max_bad_row_fraction of the training rows (at least one row is allowed) the run fails."""
    allowed = max(1, int(cfg.data.max_bad_row_fraction * train_rows))
    bad = count_reject_rows(storage.join(run_uri, REJECTS_DIR))
    if bad > allowed:
        raise BadRowsError(f"{bad} of {train_rows} training rows do not decode (more than "
                           f"data.max_bad_row_fraction={cfg.data.max_bad_row_fraction}); shard and id of each are in "
                           f"{storage.join(run_uri, REJECTS_DIR)}")


class BadRowsError(ValueError):
    """Too many training rows do not decode: the data is broken, not the run."""


def log_interval(engine, window: dict, cfg: PretrainConfig, step: int, logger: RunLogger,
                 device: torch.device, world: int) -> dict:
    loss, wait, seconds = all_mean([window["loss"] / window["steps"], window["wait"], window["time"]], device, world)
    entry = {"step": step, "loss": loss, **temperatures(engine.module), "lr": engine.get_lr()[0],
             "samples_per_s": window["steps"] * cfg.train.batch_size * world / max(seconds, 1e-9),
             "data_wait_share": wait / max(seconds, 1e-9)}
    logger.scalars(step, {f"train/{k}": v for k, v in entry.items() if k != "step"})
    logger.interval(entry, cfg.train.steps)
    return {f"train/{k}": v for k, v in entry.items() if k != "step"}


def finish(engine, model_cfg: ClapModelConfig, cfg: PretrainConfig, state: dict, logger: RunLogger,
           valid: ValidSet | None, rank: int, world: int, device: torch.device, run_uri: str) -> None:
    """Consolidated `save_pretrained` export, probe embeddings of the engine, metrics.json and the PNG."""
    weights = consolidated_state_dict(engine)
    probe = engine_probe(engine, valid, device) if valid is not None else None
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        export = ClapModel(model_cfg, tokenizer=engine.module.tokenizer)
        export.load_state_dict(weights)
        export.save_pretrained(Path(tmp) / "final")
        if probe is not None:
            np.savez(Path(tmp) / "engine_probe.npz", **probe)
        summary = {"step": state["step"], "config_hash": config_hash(cfg), "resumes": state["resumes"],
                   "history": logger.history, "evals": logger.evals,
                   "final_eval": logger.evals[-1] if logger.evals else None}
        Path(tmp, "metrics.json").write_text(json.dumps(summary, indent=1))
        plot_curves(logger.history, logger.evals, Path(tmp) / "curves.png")
        for name in ("final", "engine_probe.npz", "metrics.json", "curves.png"):
            if Path(tmp, name).exists():
                storage.upload(Path(tmp, name), storage.join(run_uri, name))
    logger.sync()
    console_line(f"exported {run_uri.rstrip('/')}/final (step {state['step']})")


@torch.no_grad()
def engine_probe(engine, valid: ValidSet, device: torch.device) -> dict[str, np.ndarray]:
    """The trained engine's embeddings of a few validation pairs, to check the export against."""
    model = engine.module
    model.eval()
    rows = np.arange(min(PROBE_CLIPS, len(valid)))
    text_rows = valid.main_caption_rows[rows]
    ids, mask = trim_padding(valid.tokens["input_ids"][text_rows], valid.tokens["attention_mask"][text_rows])
    audio = model.encode_audio(torch.from_numpy(valid.waves[rows]).to(device),
                               lengths=torch.from_numpy(valid.lengths[rows]).to(device))
    text = model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
    model.train()
    return {"waves": valid.waves[rows], "lengths": valid.lengths[rows], "input_ids": ids, "attention_mask": mask,
            "audio_embeds": audio.float().cpu().numpy(), "text_embeds": text.float().cpu().numpy()}


# ---------------------------------------------------------------------------------------------
# driver


def build_datasets(data_uri: str, cfg: PretrainConfig, model_cfg: ClapModelConfig,
                   rejects_uri: str | None = None) -> dict[str, ray.data.Dataset]:
    """Train (decoded, tokenized; undecodable rows go to rejects_uri with shard and id) and valid datasets."""
    fs, _ = resolve_fs(data_uri)
    train_files = shard_files(data_uri, cfg.data.train_split)  # manifest.json's list: never crash debris
    if not train_files:
        raise FileNotFoundError(f"no training shards at {data_uri.rstrip('/')}/{cfg.data.train_split}")
    transform = PairBatchTransform.for_model(model_cfg, training=True, clip_seconds=cfg.data.max_clip_seconds)
    transform.rejects_uri = rejects_uri
    compute = ray.data.TaskPoolStrategy(size=cfg.data.decode_tasks) if cfg.data.decode_tasks else None
    passes = max(1, math.ceil(cfg.data.min_epoch_rows / max(count_rows(data_uri, cfg.data.train_split), 1)))
    train = (ray.data.read_parquet(_paths(train_files) * passes, filesystem=fs, include_paths=True)
             .select_columns(["id", "path", "audio", "caption", "captions"])
             .randomize_block_order()
             .map_batches(transform, batch_size=cfg.data.decode_batch_size, batch_format="numpy", compute=compute))
    datasets = {"train": train}
    valid_files = shard_files(data_uri, cfg.data.valid_split) if cfg.data.valid_split else []
    if valid_files:
        datasets["valid"] = (ray.data.read_parquet(_paths(valid_files), filesystem=fs)
                             .select_columns(["id", "audio", "caption", "captions", "augment"]))
    return datasets


def _paths(uris: list[str]) -> list[str]:
    """URIs -> paths inside their pyarrow filesystem (what read_parquet takes with `filesystem=`)."""
    return [resolve_fs(u)[1] for u in uris]


INGEST_CPUS = 1.0  # kept free for the Ray Data tasks that read, decode and feed the workers


def worker_resources_for(scaling, cluster_cpus: float) -> dict | None:
    """The workers' resources: as configured, except that CPU workers on a small Ray share what is left after
    INGEST_CPUS (2 workers x 1 CPU on 2 CPUs would starve the data pipeline and hang the run)."""
    if scaling.resources_per_worker or scaling.use_gpu:
        return scaling.resources_per_worker or None
    if cluster_cpus >= scaling.num_workers + INGEST_CPUS or cluster_cpus <= INGEST_CPUS:
        return None  # Ray Train's default: 1 CPU each
    share = round((cluster_cpus - INGEST_CPUS) / scaling.num_workers, 3)
    print(f"clap pretrain: Ray has {cluster_cpus:g} CPUs: each of the {scaling.num_workers} workers gets {share:g} "
          f"CPU so that {INGEST_CPUS:g} stays free for data ingest (set scaling.resources_per_worker to choose)",
          file=sys.stderr, flush=True)
    return {"CPU": share}


def run_config(output: str, cfg: PretrainConfig) -> RunConfig:
    """A stable run name (the output's last path component) so the same command finds its checkpoints."""
    fs, path = resolve_fs(output)
    parent, name = path.rstrip("/").rsplit("/", 1)
    return RunConfig(name=name, storage_path=parent, storage_filesystem=fs,
                     failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints))


def pretrain(data: str, output: str, model: str, cfg: PretrainConfig, export_only: bool = False):
    """Run (or resume) training; returns the Ray Train result."""
    data, output = storage.absolute(data), storage.absolute(output)
    for uri in (data, output):
        storage.check_access(uri)  # a missing bucket or refused credentials stop here, naming the URI
    model_cfg = resolve_model_config(model, cfg.model)
    init_ray()  # a local Ray, or the cluster this job was submitted to (RAY_ADDRESS)
    with tempfile.TemporaryDirectory() as tmp:
        dump_yaml(cfg, Path(tmp) / "pretrain_config.yaml")
        dump_yaml(model_cfg, Path(tmp) / "model_config.yaml")
        for name in ("pretrain_config.yaml", "model_config.yaml"):
            storage.upload(Path(tmp) / name, storage.join(output, name))
    datasets = build_datasets(data, cfg, model_cfg, rejects_uri=storage.join(output, REJECTS_DIR))
    scaling = cfg.scaling
    worker_resources = worker_resources_for(scaling, ray.cluster_resources().get("CPU", 0))
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"pretrain": to_dict(cfg), "model": to_dict(model_cfg), "run_uri": output,
                           "export_only": export_only, "has_valid": "valid" in datasets,
                           "train_rows": count_rows(data, cfg.data.train_split)},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=worker_resources),
        run_config=run_config(output, cfg),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    import ray.train.v2.api.data_parallel_trainer as trainer_module  # Ray Train's only hook for the policy

    default_policy = trainer_module.create_failure_policy
    trainer_module.create_failure_policy = fail_fast_policy
    try:
        return trainer.fit()
    finally:
        trainer_module.create_failure_policy = default_policy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder or s3:// prefix written by `clap preprocess`")
    parser.add_argument("--output", required=True, help="run folder or s3:// prefix (re-running resumes it)")
    parser.add_argument("--model", default="tiny", help="registered model name or model YAML (default: tiny)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="pretraining YAML (default: shipped)")
    parser.add_argument("--export-only", action="store_true",
                        help="load the latest checkpoint of --output and write final/ without training")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=500 scaling.num_workers=4")


def run(args: argparse.Namespace) -> int:
    cfg = load_pretrain_config(args.config, args.overrides)
    try:
        result = pretrain(args.data, args.output, args.model, cfg, export_only=args.export_only)
    except ray.train.TrainingFailedError as e:
        setup = [err for err in getattr(e, "worker_failures", {}).values() if isinstance(err, SetupError)]
        if not setup:
            raise
        print(f"clap pretrain: {setup[0]} (a setup error: not retried)", file=sys.stderr)
        return 1
    metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith(("step", "val/t2a", "train/loss"))}
    print(json.dumps({"output": args.output, **metrics}))
    return 0
