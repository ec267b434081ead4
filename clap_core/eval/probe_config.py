"""The config of the MELD probe and of its sweep (`clap tune-probe`): one dataclass per YAML section.

    cfg = load_probe_sweep_config("pipelines/configs/tune_probe.yaml", ["tune.num_samples=64", "probe.mode=audio"])
    cfg.probe   # ProbeConfig: one probe's settings (also the sweep's first trial)
    cfg.search  # SearchSpace: what Optuna varies
    cfg.tune    # TuneConfig: trials, concurrency, ASHA
    cfg.embed   # EmbedConfig: the `clap embed` job that fills the embedding cache

Every field has one comment; unknown keys and out-of-range values are a ConfigError naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from clap_core.config import ConfigError, load_config

MAX_EPOCHS = 20  # the sweep's upper bound on epochs, as in the CLARA MELD experiment


@dataclass
class ProbeConfig:
    mode: Literal["concat", "audio", "text"] = "concat"  # concat: [audio; text] (2d inputs); or one modality (d)
    audio_features: Literal["embedding", "last", "weighted"] = "embedding"  # CLAP embedding, or a speech
    # tower's pooled last layer, or a learned weighted sum of all its layers (needs `clap embed` audio_layers)
    hidden: tuple[int, ...] = (512, 128)  # hidden layer widths; () is a linear probe
    dropout: float = 0.2  # after every hidden layer
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    batch_size: int = 64  # training examples per step
    epochs: int = 20  # upper bound; early stopping usually ends sooner
    class_weights: bool = False  # weight the cross-entropy by inverse class frequency of the train split
    patience: int = 5  # epochs without a better validation weighted F1 before stopping
    standardize: bool = True  # z-score each input feature with train-split statistics (kept in the probe)
    seed: int = 0  # initialisation, shuffling and dropout

    def __post_init__(self):
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise ConfigError(f"config key 'epochs' must be in [1, {MAX_EPOCHS}], got {self.epochs}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'dropout' must be in [0, 1), got {self.dropout}")
        if self.patience < 1 or self.batch_size < 1 or any(w < 1 for w in self.hidden):
            raise ConfigError("config keys 'patience', 'batch_size' and 'hidden' widths must be >= 1")


@dataclass
class SearchSpace:
    lr: tuple[float, float] = (1e-4, 3e-3)  # log-uniform range of the learning rate
    weight_decay: tuple[float, float] = (1e-6, 1e-2)  # log-uniform range of the weight decay
    dropout: tuple[float, float] = (0.0, 0.5)  # uniform range of the dropout
    hidden: list[list[int]] = field(default_factory=lambda: [[512, 128], [256, 64], [1024, 256], [256]])  # choices
    batch_size: list[int] = field(default_factory=lambda: [32, 64, 128])  # choices
    class_weights: list[bool] = field(default_factory=lambda: [False, True])  # choices
    epochs: tuple[int, int] = (8, 20)  # integer range, both ends included, at most 20
    audio_features: list[str] = field(default_factory=lambda: ["embedding", "last", "weighted"])  # choices, only
    # swept when the checkpoint has a speech tower (else probe.audio_features is used)

    def __post_init__(self):
        for key in ("lr", "weight_decay", "dropout", "epochs"):
            low, high = getattr(self, key)
            if not low <= high:
                raise ConfigError(f"config key 'search.{key}' must be [low, high] with low <= high, got {[low, high]}")
        if self.lr[0] <= 0 or self.weight_decay[0] <= 0:
            raise ConfigError("config keys 'search.lr' and 'search.weight_decay' are log-uniform: bounds must be > 0")
        if not (1 <= self.epochs[0] and self.epochs[1] <= MAX_EPOCHS):
            raise ConfigError(f"config key 'search.epochs' must lie in [1, {MAX_EPOCHS}], got {list(self.epochs)}")
        if not set(self.audio_features) <= {"embedding", "last", "weighted"} or not self.audio_features:
            raise ConfigError("config key 'search.audio_features' takes choices among embedding, last, weighted; "
                              f"got {list(self.audio_features)}")
        if not (self.hidden and self.batch_size and self.class_weights):
            raise ConfigError("config keys 'search.hidden', 'search.batch_size', 'search.class_weights' need a choice")


@dataclass
class TuneConfig:
    name: str = "meld_probe"  # experiment folder under OUTPUT; stable, so running again resumes it
    num_samples: int = 16  # trials
    max_concurrent_trials: int = 4  # trials running at once
    cpus_per_trial: float = 1.0  # Ray resources of one trial
    gpus_per_trial: float = 0.0  # the probe is small: CPUs are usually enough
    grace_period: int = 3  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 3  # ASHA: 1/reduction_factor of the trials go on at each rung
    seed: int = 0  # Optuna TPE sampler seed

    def __post_init__(self):
        if self.num_samples < 1 or self.max_concurrent_trials < 1 or self.grace_period < 1:
            raise ConfigError("config keys 'tune.num_samples', 'tune.max_concurrent_trials' and "
                              "'tune.grace_period' must be >= 1")


@dataclass
class EmbedConfig:
    batch_size: int = 16  # clips per model call of `clap embed`
    concurrency: Optional[int] = None  # embedding actors (None: one per GPU, else 2)


@dataclass
class ProbeSweepConfig:
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # fixed settings; its values are the first trial
    search: SearchSpace = field(default_factory=SearchSpace)  # what Optuna varies
    tune: TuneConfig = field(default_factory=TuneConfig)  # trials, concurrency, ASHA
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # the embedding job that fills the cache


def hidden_key(widths) -> str:
    """[512, 128] -> '512x128' (Optuna choices must be scalars); [] -> 'linear'."""
    return "x".join(str(w) for w in widths) or "linear"


def parse_hidden(key: str) -> tuple[int, ...]:
    return () if key == "linear" else tuple(int(w) for w in key.split("x"))


def with_params(base: ProbeConfig, params: dict) -> ProbeConfig:
    """The base probe config with a trial's sampled hyperparameters."""
    params = dict(params)
    if "hidden" in params:
        params["hidden"] = parse_hidden(params["hidden"])
    return dataclasses.replace(base, **params)


def load_probe_sweep_config(source: str | Path | dict | None = None,
                            overrides: list[str] | None = None) -> ProbeSweepConfig:
    return load_config(ProbeSweepConfig, source, overrides)
