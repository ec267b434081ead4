"""`PretrainConfig`: everything `clap pretrain` reads, one YAML (pipelines/configs/pretrain.yaml) plus overrides.

    cfg = load_pretrain_config("pipelines/configs/pretrain.yaml", ["train.steps=200", "scaling.num_workers=4"])

The model architecture comes from `--model NAME`; the `model` section holds overrides of its keys
(e.g. `model.text_encoder.frozen=true`), checked against the model's own dataclasses.

One dataclass per YAML section: `train` TrainConfig, `deepspeed` DeepSpeedConfig, `scaling`
PretrainScalingConfig, `data` PretrainDataConfig (the prefix keeps them apart from Ray Train's own
`ScalingConfig` and `DataConfig`, which pipelines/pretrain.py builds from them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clap_core.config import ConfigError, from_dict, load_config, read_yaml
from clap_core.model.config import MODEL_CONFIG_DIR, ClapModelConfig, list_models, offline_mode, offline_variant


@dataclass
class TrainConfig:
    steps: int = 1000  # total optimizer steps of the run (a resumed run ends here too)
    batch_size: int = 32  # pairs per worker per step; the contrastive batch is batch_size x num_workers
    lr: float = 5e-4  # peak learning rate of new parameters (projection heads, temperature, scratch encoders)
    lr_pretrained: float | None = None  # peak learning rate of encoders loaded from a checkpoint (None: lr)
    weight_decay: float = 0.2  # AdamW decay of weight matrices; never applied to norms, biases, the temperature
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (CLIP's 0.98 keeps large-batch training stable)
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 100  # linear warmup from 0 to the peak learning rate
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of the peak
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    grad_cache_chunk: int = 0  # gradient cache: re-run the encoders this many pairs at a time (0: plain step)
    local_loss: bool = True  # each rank scores its rows against the global batch: (B, W*B) logits, same gradient
    seed: int = 0  # model init, dropout and crops
    log_every: int = 10  # steps between console lines / TensorBoard points / Ray Train reports
    eval_every: int = 200  # steps between validation retrieval evaluations (0: only at the end)
    checkpoint_every: int = 200  # steps between DeepSpeed checkpoints (the last step always checkpoints)
    keep_checkpoints: int = 2  # how many DeepSpeed checkpoints the run folder keeps
    eval_batch_size: int = 64  # pairs per forward pass during validation
    kill_worker_at_step: int = 0  # fault injection for tests: the last rank exits once at this step (0: off)


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 1  # ZeRO: 1 shards optimizer states, 2 also gradients, 3 also parameters
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload_optimizer: bool = False  # keep optimizer states in CPU memory (ZeRO 1-3)
    offload_params: bool = False  # keep parameters in CPU memory (ZeRO 3 only)
    overlap_comm: bool = False  # overlap gradient reduction with backward (GPU)


@dataclass
class PretrainScalingConfig:
    num_workers: int = 2  # data-parallel training workers (one per GPU)
    use_gpu: bool = False  # one GPU per worker, NCCL; False: CPU workers, gloo
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # e.g. {CPU: 4, GPU: 1}; {} = Ray's default
    max_failures: int = 3  # worker-group restarts from the latest checkpoint (lost worker or node) before failing


@dataclass
class PretrainDataConfig:
    train_split: str = "train"  # folder of training shards under --data
    valid_split: str | None = "valid"  # folder of validation shards (None: no evaluation)
    shuffle_buffer: int = 1024  # rows in each worker's shuffle buffer: rows stream through it across epochs and
    # each step takes batch_size random ones of distinct clips (clap_core/train/feed.py); at most two passes of
    # the worker's share of the split; 0: the stream's order. Memory: a row of 10 s at 48 kHz is 1.92 MB, so
    # 1024 rows hold ~2 GB in each worker
    prefetch_batches: int = 4  # batches each worker prepares ahead of the step
    max_clip_seconds: float | None = None  # training crop length (None: the model's clip_seconds)
    max_valid_clips: int = 1024  # evaluate on at most this many validation clips
    decode_batch_size: int = 64  # rows per Ray Data decode/tokenize task
    decode_tasks: int | None = None  # most decode/tokenize tasks at once (None: as many as free CPUs allow)
    max_bad_row_fraction: float = 0.001  # undecodable training rows are skipped and listed in RUN/_rejects/;
    # the run fails once more than this share of the training rows (and more than one row) is bad
    min_epoch_rows: int | None = None  # a small corpus is read several times per Ray Data epoch (fresh crops
    # and captions each pass), so the seconds an epoch boundary stalls are not paid every few steps; None: the
    # rows the whole run trains on (steps x batch_size x num_workers) and its feeds read ahead: no boundary
    # mid-run. At most 1024 passes.


@dataclass
class PretrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: PretrainScalingConfig = field(default_factory=PretrainScalingConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the --model architecture's keys

    def __post_init__(self) -> None:
        if self.train.steps < 1 or self.train.batch_size < 1:
            raise ConfigError("config keys 'train.steps' and 'train.batch_size' must be >= 1")
        chunk = self.train.grad_cache_chunk
        if chunk < 0 or (chunk and self.train.batch_size % chunk):
            raise ConfigError(f"config key 'train.grad_cache_chunk' ({chunk}) must be 0 or divide "
                              f"train.batch_size ({self.train.batch_size})")
        if self.deepspeed.offload_params and self.deepspeed.zero_stage != 3:
            raise ConfigError("config key 'deepspeed.offload_params' needs deepspeed.zero_stage=3")


def load_pretrain_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    return load_config(PretrainConfig, path, overrides)


def resolve_model_config(name_or_path: str, overrides: dict[str, Any]) -> ClapModelConfig:
    """The --model architecture with the config's `model` section merged in; errors name 'model.<key>'."""
    path = Path(name_or_path)
    if not path.suffix:
        path = MODEL_CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown model '{name_or_path}'; registered models: {', '.join(list_models())}")
    cfg = from_dict(ClapModelConfig, _deep_merge(read_yaml(path), overrides), prefix="model")
    return offline_variant(cfg) if offline_mode() else cfg


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
