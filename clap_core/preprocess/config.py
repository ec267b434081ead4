"""`clap preprocess` configuration (shipped default: pipelines/configs/preprocess.yaml).

    cfg = load_preprocess_config(None, ["audio.long_clip=reject", "augment.copies=2"])

Sections: `input` (how manifests are read), `audio` (decode + validation rules), `augment` (the
augmentation chain, clap_core.audio.augment.AugmentConfig), `captions` (merger for environmental mixes),
`output` (shard size and FLAC format), `ray` (parallelism only: changing it never invalidates a
partly written output), `debug` (fault injection for tests).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clap_core.audio.augment import AugmentConfig
from clap_core.config import ConfigError, load_config
from clap_core.data.captions import MERGE_PROMPT, MIX_CAPTION_TEMPLATE


@dataclass
class InputConfig:
    encoding: str = "utf-8"  # text encoding of manifests and sidecars; undecodable captions are rejected
    audio_dir: str | None = None  # AudioCaps/Clotho: folder of the audio files (default: next to the CSV)
    default_split: str = "train"  # split of rows that name none
    plan_group_rows: int = 200_000  # rows per planning group: env-mix partners come from the same split in a group


@dataclass
class AudioConfig:
    mono: bool = True  # downmix to one channel (augmentation needs mono)
    target_sr: int = 48_000  # output sample rate (soxr VHQ resampling)
    max_channels: int = 6  # more input channels than this: rejected (too_many_channels); 5.1 passes
    min_seconds: float = 0.5  # shorter clips: rejected (too_short)
    max_seconds: float = 30.0  # longer clips: see long_clip
    long_clip: Literal["split", "reject"] = "split"  # split: equal segments <= max_seconds, ids "<id>#seg<k>"
    silence: Literal["reject", "keep"] = "reject"  # a clip whose peak is below silence_threshold_db
    silence_threshold_db: float = -60.0  # peak level in dBFS under which a clip (or a segment) counts as silent
    max_source_seconds: float = 14_400.0  # long_clip=split: longer sources (declared or decoded) are too_long
    over_full_scale: Literal["normalize", "reject"] = "normalize"  # float audio peaking > 1.0: scaled to 1.0
    # (recorded in `augment` as "normalized") or rejected (over_full_scale) instead of silently clipped


@dataclass
class CaptionsConfig:
    merger: Literal["template", "seq2seq"] = "template"  # how an env mix's caption is written
    template: str = MIX_CAPTION_TEMPLATE  # merger=template: {speech} and {env} are filled with the two captions
    model: str | None = None  # seq2seq: local path of a transformers text-to-text model
    prompt: str = MERGE_PROMPT  # seq2seq input


@dataclass
class OutputConfig:
    shard_mb: float = 256.0  # a unit rolls over to a new shard file when its audio reaches this size
    rows_per_unit: int = 0  # input rows per work unit; 0: derived from shard_mb and expected_clip_seconds
    expected_clip_seconds: float = 10.0  # typical clip length, to size units so one unit ~ one shard
    flac_subtype: Literal["PCM_16", "PCM_24"] = "PCM_16"
    row_group_rows: int = 64  # Parquet row group size (readers fetch whole row groups)


@dataclass
class RayConfig:
    concurrency: int = 0  # fixed number of unit actors; 0: the autoscaling range min_workers..max_workers
    min_workers: int = 1  # unit actors always kept (Ray Data ActorPoolStrategy min_size)
    max_workers: int = 0  # unit actors the pool may grow to; 0: one per unit (the autoscaler adds nodes)
    num_cpus: float = 1.0  # CPUs reserved per worker (and per planning task)
    plan_chunk_mb: float = 16.0  # JSONL and CSV manifests are read and validated in byte ranges of this size


@dataclass
class DebugConfig:
    crash_after_units: int = 0  # tests: the driver raises SimulatedCrash once this many units committed


@dataclass
class PreprocessConfig:
    input: InputConfig = field(default_factory=InputConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self):
        checks = [
            (self.augment.copies >= 0, "augment.copies must be >= 0"),
            (self.audio.mono or self.augment.copies == 0, "augment.copies > 0 needs audio.mono=true"),
            (0 < self.audio.min_seconds < self.audio.max_seconds, "need 0 < audio.min_seconds < audio.max_seconds"),
            (self.audio.long_clip == "reject" or self.audio.max_seconds >= 2 * self.audio.min_seconds,
             "audio.long_clip=split needs audio.max_seconds >= 2 * audio.min_seconds"),
            (self.audio.max_channels >= 1, "audio.max_channels must be >= 1"),
            (self.audio.max_source_seconds >= self.audio.max_seconds, "need audio.max_source_seconds >= audio.max_seconds"),
            (self.output.shard_mb > 0, "output.shard_mb must be > 0"),
            (self.output.rows_per_unit >= 0, "output.rows_per_unit must be >= 0"),
            (self.input.plan_group_rows >= 1, "input.plan_group_rows must be >= 1"),
            (self.ray.min_workers >= 1, "ray.min_workers must be >= 1"),
            (self.ray.max_workers == 0 or self.ray.max_workers >= self.ray.min_workers,
             "ray.max_workers must be 0 (one per unit) or >= ray.min_workers"),
            (self.ray.plan_chunk_mb > 0, "ray.plan_chunk_mb must be > 0"),
            (self.captions.merger == "template" or self.captions.model, "captions.merger=seq2seq needs captions.model"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def load_preprocess_config(source: str | Path | dict | None = None, overrides: list[str] | None = None) -> PreprocessConfig:
    return load_config(PreprocessConfig, source, overrides)
