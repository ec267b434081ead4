"""Model architecture configs: typed dataclasses, and a registry of named YAML files.

    cfg = get_model_config("htsat-tiny-roberta", ["embed_dim=256"])
    list_models()  # ['clara-perceiver', 'cnn14-bert', 'htsat-tiny-roberta', 'tiny']

Each `clap_core/configs/models/<name>.yaml` is one architecture. A path to a YAML file works too.

Offline mode (`clap --offline ...` or CLAP_OFFLINE=1): a text encoder named by hub id is built from its
`hf_config` with random weights (text_encoder.pretrained=null) and the built-in byte tokenizer
(text_encoder.tokenizer=bytes), its vocabulary sized to that tokenizer (260 rows, not XLM-R's 250k), so every
named model builds without network. Local folders (pretrained or tokenizer) are kept as they are.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clap_core.config import ConfigError, load_config

MODEL_CONFIG_DIR = Path(__file__).parents[1] / "configs" / "models"


@dataclass
class AudioFrontendConfig:
    sample_rate: int = 48_000  # waveforms given to the model must be at this rate (Hz)
    n_fft: int = 1024  # STFT window and FFT size (samples)
    hop_length: int = 480  # STFT hop: 480 at 48 kHz = 100 frames per second
    n_mels: int = 64  # mel bins
    f_min: float = 50.0  # lowest mel filter edge (Hz)
    f_max: float = 14_000.0  # highest mel filter edge (Hz)
    clip_seconds: float = 10.0  # fixed model input length: longer clips are cropped, shorter padded
    pad_mode: Literal["repeatpad", "zero"] = "repeatpad"  # LAION repeats short clips, then zero-pads
    fusion: bool = False  # LAION feature fusion for long clips (global view + 3 local chunks); HTS-AT only
    mel_scale: Literal["htk", "slaney"] = "htk"  # htk (torchaudio; LAION fused) or slaney (librosa; LAION unfused)


# --- audio encoders: one dataclass per `type`, its fields are the encoder's constructor kwargs ---


@dataclass
class ConvEncoderConfig:
    type: Literal["conv"] = "conv"  # tiny 2D-conv log-mel encoder (tests, demo)
    channels: tuple[int, ...] = (16, 32, 64)  # conv block widths
    embed_dim: int = 64  # pooled output size


@dataclass
class Cnn14Config:
    type: Literal["cnn14"] = "cnn14"  # PANNs CNN14, the 2022 Microsoft CLAP audio encoder
    channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)  # six conv block widths
    embed_dim: int = 2048  # fc1 output size
    dropout: float = 0.2  # dropout before fc1


@dataclass
class PerceiverConfig:
    type: Literal["perceiver"] = "perceiver"  # CLARA: conv head + Perceiver over learned latents
    conv_channels: int = 256  # channels of the Conv1d head over time
    conv_layers: int = 2  # Conv1d layers in the head
    conv_stride: int = 2  # time stride of each head layer
    num_latents: int = 64  # learned latents; cost is linear in clip length
    latent_dim: int = 256  # latent width; output is mean+max pooled -> 2 * latent_dim
    cross_heads: int = 1  # heads of the latent->frames cross-attention
    self_heads: int = 8  # heads of the latent self-attention layers
    self_layers: int = 4  # latent transformer layers
    mlp_ratio: int = 4  # MLP width multiplier (GELU)
    dropout: float = 0.1  # dropout in attention and MLPs
    max_frames: int = 4096  # longest input in frames after the conv head


@dataclass
class HTSATConfig:
    type: Literal["htsat"] = "htsat"  # HTS-AT (transformers' ClapAudioModel), the LAION-CLAP encoder
    spec_size: int = 256  # Swin input side; time is interpolated to spec_size * (spec_size // n_mels)
    patch_size: int = 4  # patch side
    patch_stride: tuple[int, int] = (4, 4)  # patch stride
    patch_embeds_hidden_size: int = 96  # width of the first stage; doubles every stage
    depths: tuple[int, ...] = (2, 2, 6, 2)  # Swin blocks per stage
    num_attention_heads: tuple[int, ...] = (4, 8, 16, 32)  # heads per stage
    window_size: int = 8  # Swin window
    mlp_ratio: float = 4.0  # MLP width multiplier
    hidden_dropout_prob: float = 0.0  # dropout after each Swin block's MLP (LAION-CLAP's HTS-AT: none)
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly over the blocks to this (LAION-CLAP: 0.1)
    enable_fusion: bool = False  # attentional feature fusion of the 4 views (set with audio.fusion)
    fusion_type: str | None = None  # transformers' fusion variant ("aff_2d" in LAION's fused models)


@dataclass
class Wav2Vec2EncoderConfig:
    """wav2vec 2.0 on the raw waveform, resampled to 16 kHz inside the model (clap_core/encoders/wav2vec2.py)."""

    type: Literal["wav2vec2"] = "wav2vec2"  # transformers' Wav2Vec2Model (also XLS-R, HuBERT-style checkpoints of it)
    pretrained: str | None = None  # local folder or hub name for Wav2Vec2Model.from_pretrained; None: from hf_config
    hf_config: dict[str, Any] = field(default_factory=dict)  # Wav2Vec2Config kwargs (offline, random init)
    do_normalize: bool | None = None  # zero-mean unit-var per clip; None: as the folder's feature extractor says
    attention_mask: bool | None = None  # pass the padding mask; None: as the extractor says (layer-norm models)
    pooling: Literal["mean", "attention"] = "mean"  # over real frames: mean, or one learned attention query
    layers: Literal["last", "weighted"] = "last"  # pool the last layer, or a learned softmax-weighted sum of all
    freeze_feature_encoder: bool = True  # keep the convolutional feature encoder fixed (the usual fine-tuning)
    gradient_checkpointing: bool = False  # recompute transformer layers in backward: memory for compute
    layerdrop: float | None = None  # probability of skipping a layer in training; None: the backbone's value


@dataclass
class WhisperEncoderConfig:
    """Whisper's encoder on its own log-mel, computed at 16 kHz inside the model (clap_core/encoders/whisper.py)."""

    type: Literal["whisper"] = "whisper"  # transformers' WhisperEncoder (the decoder is not used)
    pretrained: str | None = None  # local folder or hub name of a WhisperModel; None: from hf_config
    hf_config: dict[str, Any] = field(default_factory=dict)  # WhisperConfig kwargs (offline, random init)
    pooling: Literal["mean", "attention"] = "mean"  # over real frames: mean, or one learned attention query
    layers: Literal["last", "weighted"] = "last"  # pool the last layer, or a learned softmax-weighted sum of all
    mask_padding: bool = True  # crop the batch to its longest clip and mask padding frames in self-attention
    gradient_checkpointing: bool = False  # recompute encoder layers in backward: memory for compute
    layerdrop: float | None = None  # probability of skipping a layer in training; None: the backbone's value


SPEECH_ENCODERS = ("wav2vec2", "whisper")  # towers that take waveforms and resample to 16 kHz themselves


@dataclass
class AudioEncoderConfig:
    """Picks its concrete dataclass from `type` (see `__variants__`)."""

    type: str = "conv"
    __variants__ = {"type": {"conv": ConvEncoderConfig, "cnn14": Cnn14Config, "perceiver": PerceiverConfig,
                             "htsat": HTSATConfig, "wav2vec2": Wav2Vec2EncoderConfig,
                             "whisper": WhisperEncoderConfig}}


@dataclass
class TextEncoderConfig:
    pretrained: str | None = None  # hub name or local folder for AutoModel.from_pretrained; None: build from hf_config
    hf_config: dict[str, Any] = field(default_factory=dict)  # transformers config kwargs incl. model_type (offline init)
    tokenizer: str = "bytes"  # hub name or local folder for AutoTokenizer, or "bytes" (built-in byte-level tokenizer)
    pooling: Literal["cls", "mean", "last", "mean_max", "pooler"] = "mean"  # how token states become one vector
    max_length: int = 77  # token ids per caption (longer captions are truncated; longer ids rejected)
    frozen: bool = False  # keep the text encoder fixed during training (MS-CLAP 2023)


@dataclass
class ProjectionConfig:
    layers: int = 2  # 1: a linear map (CLIP); 2: linear-act-linear (LAION-CLAP)
    activation: Literal["relu", "gelu"] = "relu"  # between the two layers


@dataclass
class TemperatureConfig:
    init: float = 0.07  # initial temperature (logit scale = 1 / init, CLIP-style)
    max_scale: float = 100.0  # logit scale is clamped to this (infonce and siglip)
    per_modality: bool = False  # one learnable temperature per modality (CLARA); infonce only
    learnable: bool = True  # freeze the temperature at `init` when false


@dataclass
class ClapModelConfig:
    name: str = "custom"  # architecture name (registry key)
    embed_dim: int = 512  # size of the shared audio-text embedding space
    loss: Literal["infonce", "siglip"] = "infonce"  # contrastive objective the temperature params belong to
    audio: AudioFrontendConfig = field(default_factory=AudioFrontendConfig)
    audio_encoder: AudioEncoderConfig = field(default_factory=ConvEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    audio_projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    text_projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)

    def __post_init__(self) -> None:
        if self.audio.fusion and not getattr(self.audio_encoder, "enable_fusion", False):
            raise ConfigError("audio.fusion=true needs an htsat audio_encoder with enable_fusion=true")
        if self.loss == "siglip" and self.temperature.per_modality:
            # the sigmoid loss scores each pair once (no audio->text / text->audio directions to separate)
            raise ConfigError("temperature.per_modality=true applies to loss=infonce only: siglip learns one "
                              "scale and a bias (temperature.init and temperature.max_scale apply)")


OFFLINE_ENV = "CLAP_OFFLINE"  # "1": build named models without the hub (see offline_variant)


def offline_mode() -> bool:
    return os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes")


def offline_variant(cfg: ClapModelConfig) -> ClapModelConfig:
    """The same architecture buildable without the hub: hub weights and tokenizers -> random init + bytes."""
    from clap_core.model.encoders.text import BUILTIN_TOKENIZERS, byte_level_tokenizer

    text = cfg.text_encoder
    pretrained = text.pretrained if text.pretrained and Path(text.pretrained).is_dir() else None
    tokenizer = text.tokenizer
    hf_config = dict(text.hf_config)
    if tokenizer not in BUILTIN_TOKENIZERS and not Path(tokenizer).is_dir():
        tokenizer = "bytes"
        if pretrained is None:  # an embedding row per token of the byte tokenizer, no more
            hf_config["vocab_size"] = len(byte_level_tokenizer(text.max_length))
    text = dataclasses.replace(text, pretrained=pretrained, tokenizer=tokenizer, hf_config=hf_config)
    return dataclasses.replace(cfg, text_encoder=text)


def list_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def describe_model(name: str) -> str:
    """What a registered architecture is for: the first sentence of its YAML's leading comment."""
    words = []
    for line in (MODEL_CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("# ").strip())
        if words[-1].endswith("."):
            break
    return " ".join(words)


def get_model_config(name_or_path: str | Path, overrides: list[str] | None = None) -> ClapModelConfig:
    """A registered architecture by name, or a YAML file, with optional `key=value` overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = MODEL_CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown model '{name_or_path}'; registered models: {', '.join(list_models())}")
    cfg = load_config(ClapModelConfig, path, overrides)
    return offline_variant(cfg) if offline_mode() else cfg
