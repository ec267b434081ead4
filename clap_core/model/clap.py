"""ClapModel: audio encoder + text encoder, projection heads into one space, learnable temperature.

    model = ClapModel(get_model_config("tiny"))
    batch = model.tokenize(["a dog barks", "rain on a roof"])
    out = model(waves, batch["input_ids"], batch["attention_mask"])   # waves: (B, N) at 48 kHz
    out["logits_per_audio"]   # (B, B)

Checkpoints are folders: `config.yaml` + `model.safetensors` + `tokenizer/` (no pickle anywhere).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from transformers import PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from clap_core.config import CheckpointError, to_dict
from clap_core.eval.metrics import DEFAULT_TEMPLATES
from clap_core.model import inference
from clap_core.model.config import ClapModelConfig, ProjectionConfig
from clap_core.model.encoders.cnn14 import Cnn14
from clap_core.model.encoders.conv import TinyConvEncoder
from clap_core.model.encoders.htsat import HTSATEncoder
from clap_core.model.encoders.perceiver import PerceiverAudioEncoder
from clap_core.model.encoders.speech import architecture_config
from clap_core.model.encoders.text import TextEncoder, build_text_backbone, build_tokenizer, tokenize
from clap_core.model.encoders.wav2vec2 import Wav2Vec2Encoder
from clap_core.model.encoders.whisper import WhisperAudioEncoder
from clap_core.model.folders import (  # noqa: F401
    CONFIG_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    check_checkpoint,
    is_transformers_folder,
    one_line,
)
from clap_core.model.frontend import AudioFrontend
from clap_core.train.loss import LogitScale, SigmoidLogitScale

AUDIO_ENCODERS: dict[str, type[nn.Module]] = {"conv": TinyConvEncoder, "cnn14": Cnn14,
                                              "perceiver": PerceiverAudioEncoder, "htsat": HTSATEncoder,
                                              "wav2vec2": Wav2Vec2Encoder, "whisper": WhisperAudioEncoder}
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def build_audio_encoder(encoder_cfg: Any, audio_cfg: Any) -> nn.Module:
    """Config dataclass -> flat constructor kwargs of the registered encoder class.

    Log-mel encoders get the front end's mel bins; waveform (speech) towers get its sample rate.
    """
    kwargs = dataclasses.asdict(encoder_cfg)
    cls = AUDIO_ENCODERS[kwargs.pop("type")]
    if getattr(cls, "takes_waveform", False):
        return cls(sample_rate=audio_cfg.sample_rate, **kwargs)
    return cls(n_mels=audio_cfg.n_mels, **kwargs)


def build_projection(in_dim: int, out_dim: int, cfg: ProjectionConfig) -> nn.Module:
    if cfg.layers == 1:
        return nn.Linear(in_dim, out_dim)
    if cfg.layers == 2:
        # Same layout as transformers' ClapProjectionLayer (linear1, act, linear2) so LAION weights map 1:1.
        return nn.Sequential(OrderedDict(linear1=nn.Linear(in_dim, out_dim), act=ACTIVATIONS[cfg.activation](),
                                         linear2=nn.Linear(out_dim, out_dim)))
    raise ValueError(f"projection layers must be 1 or 2, got {cfg.layers}")


class ClapModel(nn.Module):
    def __init__(self, config: ClapModelConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                 text_tower: bool = True):
        """text_tower=False builds the audio side only (front end, audio tower and projection, temperature), as
        from_pretrained(path, text_tower=False) loads it for audio-only jobs; its text methods raise."""
        super().__init__()
        self.config = config
        text_cfg = config.text_encoder
        self.tokenizer = self.text_encoder = self.text_projection = None
        if text_tower:
            self.tokenizer = tokenizer or build_tokenizer(text_cfg.tokenizer, text_cfg.max_length)
        # Built and registered in this order, whatever the towers: a seed gives the same weights, and the
        # parameters' order (optimizer state, ZeRO's flat buffers in saved runs) stays that of earlier versions.
        self.frontend = AudioFrontend(**dataclasses.asdict(config.audio))
        self.audio_encoder = build_audio_encoder(config.audio_encoder, config.audio)
        if text_tower:
            backbone = build_text_backbone(text_cfg.pretrained, text_cfg.hf_config, self.tokenizer)
            self.text_encoder = TextEncoder(backbone, text_cfg.pooling)
        self.audio_projection = build_projection(self.audio_encoder.out_dim, config.embed_dim, config.audio_projection)
        if text_tower:
            self.text_projection = build_projection(self.text_encoder.out_dim, config.embed_dim,
                                                    config.text_projection)
        self.logit_scale = self._build_logit_scale(config)
        if text_tower and text_cfg.frozen:
            self.text_encoder.requires_grad_(False)

    @staticmethod
    def _build_logit_scale(config: ClapModelConfig) -> nn.Module:
        t = config.temperature
        if config.loss == "siglip":
            scale = SigmoidLogitScale(init_scale=1.0 / t.init, max_scale=t.max_scale)
        else:
            scale = LogitScale(init_temperature=t.init, max_scale=t.max_scale, per_modality=t.per_modality)
        return scale.requires_grad_(t.learnable)

    def train(self, mode: bool = True) -> "ClapModel":
        super().train(mode)
        if self.config.text_encoder.frozen and self.has_text_tower:
            self.text_encoder.eval()  # a frozen encoder keeps its dropout off too
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- text ---

    @property
    def has_text_tower(self) -> bool:
        return self.text_encoder is not None

    def require_text_tower(self, what: str) -> None:
        if not self.has_text_tower:
            raise ValueError(f"{what} needs the text tower, and this model was loaded without it "
                             "(from_pretrained(..., text_tower=False)): load the checkpoint whole")

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> {'input_ids', 'attention_mask'} (B, L), truncated to max_length, on the model's device."""
        self.require_text_tower("tokenize")
        batch = tokenize(self.tokenizer, texts, self.config.text_encoder.max_length)
        return {name: ids.to(self.device) for name, ids in batch.items()}

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """Token ids (B, L) -> text embeddings (B, embed_dim), L2-normalised by default."""
        self.require_text_tower("encode_text")
        self._check_token_ids(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        emb = self.text_projection(self.text_encoder(input_ids, attention_mask))  # (B, D)
        return F.normalize(emb, dim=-1) if normalize else emb

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        max_len = self.config.text_encoder.max_length
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > max_len:
            raise ValueError(f"input_ids have {input_ids.shape[1]} tokens; this model takes at most {max_len} "
                             "(tokenize() truncates captions)")
        vocab = self.text_encoder.backbone.get_input_embeddings().num_embeddings
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}); got [{int(input_ids.min())}, {int(input_ids.max())}]")

    # --- audio ---

    def encode_audio(self, waveforms: torch.Tensor | np.ndarray, sample_rate: int | None = None,
                     lengths: torch.Tensor | None = None, normalize: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Waveforms (B, N) or (N,) at 48 kHz -> audio embeddings (B, embed_dim), L2-normalised by default.

        `lengths` (B,) gives each clip's real length when the batch is padded. Eval mode crops the centre
        (deterministic); train mode crops at random.
        """
        waves = self._check_waveforms(waveforms, sample_rate)
        if getattr(self.audio_encoder, "takes_waveform", False):  # speech towers compute their own features
            fixed, valid = self.frontend.fixed_waveforms(waves, lengths, generator)  # (B, clip_samples), (B,)
            emb = self.audio_projection(self.audio_encoder(fixed, valid))  # (B, D)
            return F.normalize(emb, dim=-1) if normalize else emb
        mel, is_longer = self.frontend(waves, lengths, generator)  # (B, C, T, F), (B, 1)
        return self.encode_mel(mel, is_longer, normalize)

    def encode_mel(self, mel: torch.Tensor, is_longer: torch.Tensor | None = None,
                   normalize: bool = True) -> torch.Tensor:
        """Log-mel (B, C, T, F) -> audio embeddings (B, embed_dim)."""
        weight = next(self.audio_encoder.parameters(), None)
        if weight is not None and weight.dtype != mel.dtype:  # a bf16 tower (inference.bf16_copy): fp32 mel in
            mel = mel.to(weight.dtype)
        if getattr(self.audio_encoder, "takes_is_longer", False):
            feats = self.audio_encoder(mel, is_longer)
        else:
            feats = self.audio_encoder(mel)
        emb = self.audio_projection(feats)  # (B, D)
        return F.normalize(emb, dim=-1) if normalize else emb

    def _check_waveforms(self, waveforms: torch.Tensor | np.ndarray, sample_rate: int | None) -> torch.Tensor:
        expected = self.config.audio.sample_rate
        if sample_rate is not None and sample_rate != expected:
            raise ValueError(f"waveforms must be at {expected} Hz, got {sample_rate} Hz: resample first "
                             "(clap_core.audio.codec.resample) or use embed_audio(..., sample_rate=...)")
        waves = torch.as_tensor(waveforms)
        if waves.ndim == 1:
            waves = waves[None]
        if waves.ndim != 2:
            raise ValueError(f"waveforms must be (batch, samples) or (samples,), got shape {tuple(waves.shape)}")
        if waves.shape[0] == 0 or waves.shape[1] == 0:
            raise ValueError(f"empty waveform batch: shape {tuple(waves.shape)}")
        if not torch.is_floating_point(waves):
            raise ValueError(f"waveforms must be floating point in [-1, 1], got {waves.dtype}")
        if not torch.isfinite(waves).all():
            raise ValueError("waveforms contain NaN or inf samples")
        return waves.to(self.device, torch.float32)

    # --- both ---

    def logit_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(audio->text scale, text->audio scale); equal unless the temperature is per modality."""
        scales = self.logit_scale()
        return (scales[0], scales[0]) if self.config.loss == "siglip" else scales

    def forward(self, waveforms: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        audio = self.encode_audio(waveforms, lengths=lengths)  # (B, D)
        text = self.encode_text(input_ids, attention_mask)  # (B, D)
        scale_a, scale_t = self.logit_scales()
        out = {"audio_embeds": audio, "text_embeds": text,
               "logits_per_audio": scale_a * audio @ text.T,  # (B, B)
               "logits_per_text": scale_t * text @ audio.T,  # (B, B)
               "logit_scale": scale_a, "logit_scale_text": scale_t}
        if self.config.loss == "siglip":
            out["logit_bias"] = self.logit_scale()[1]
        return out

    # --- inference API (deterministic; see clap_core.model.inference) ---

    def embed_audio(self, audio, sample_rate: int | None = None, batch_size: int = 16,
                    long_audio: inference.LongAudio = "auto", precision: inference.Precision = "auto",
                    decode_threads: int | None = None) -> np.ndarray:
        """Paths or arrays -> (N, embed_dim) unit embeddings; decodes, resamples and batches by itself.

        precision "auto": bf16 (inference.bf16_copy) where the device has native bf16, else fp32; "fp32": exact.
        decode_threads: threads decoding files a batch ahead (None: 1 on CPU, up to 4 on a GPU).
        """
        return inference.embed_audio(self, audio, sample_rate, batch_size, long_audio, precision, decode_threads)

    def embed_text(self, texts: str | Sequence[str], batch_size: int = 64,
                   precision: inference.Precision = "auto") -> np.ndarray:
        """Captions -> (N, embed_dim) unit embeddings."""
        return inference.embed_text(self, texts, batch_size, precision)

    def zero_shot(self, audio, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                  sample_rate: int | None = None) -> np.ndarray:
        """Per-label probabilities (N, len(labels)) from prompt templates ("This is a sound of {label}.")."""
        return inference.zero_shot(self, audio, labels, templates, sample_rate)

    def similarity(self, audio, texts: str | Sequence[str], sample_rate: int | None = None) -> np.ndarray:
        """Cosine similarity (N_audio, N_text)."""
        return inference.similarity(self, audio, texts, sample_rate)

    # --- checkpoints ---

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.yaml, model.safetensors and tokenizer/ into `path`."""
        self.require_text_tower("save_pretrained")  # a checkpoint is the whole model, or nothing
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(yaml.safe_dump(self._self_contained_config(), sort_keys=False))
        save_model(self, str(path / WEIGHTS_FILE))
        self.tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
        return path

    def _self_contained_config(self) -> dict:
        """The config with the text (and speech) backbones' full transformers configs inlined: loading needs no hub."""
        cfg = to_dict(self.config)
        keep = architecture_config(self.text_encoder.backbone.config)
        cfg["text_encoder"].update(pretrained=None, tokenizer=TOKENIZER_DIR, hf_config=keep)
        if hasattr(self.audio_encoder, "resolved_config"):  # a transformers audio backbone: inline it too
            cfg["audio_encoder"].update(self.audio_encoder.resolved_config())
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu",
                        text_tower: bool = True) -> "ClapModel":
        """Load a folder written by save_pretrained, or a transformers LAION-CLAP folder (imported).

        text_tower=False loads the audio side only, as transformers' ClapAudioModelWithProjection does: for
        audio-only jobs (`clap embed --no-text`), which then neither read nor hold the text tower's weights
        (RoBERTa-base: 500 MB of the 614 MB of htsat-tiny-roberta)."""
        path = Path(path)
        if is_transformers_folder(path):
            return cls.from_laion(path, text_tower=text_tower)
        config = check_checkpoint(path)
        tokenizer = None
        try:  # a local folder only (checked above): never read as a hub id
            if text_tower:
                tokenizer = build_tokenizer(str((path / TOKENIZER_DIR).resolve()), config.text_encoder.max_length)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / TOKENIZER_DIR}: the tokenizer does not load ({one_line(e)})") from None
        with no_init_weights():  # no random init: every parameter and persistent buffer is read just below
            model = cls(config, tokenizer=tokenizer, text_tower=text_tower)
        try:
            if text_tower:
                load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(map_location))
            else:  # only the tensors this model holds are read from the file
                model.load_state_dict(read_weights(path / WEIGHTS_FILE, model.state_dict(), map_location))
        except RuntimeError as e:  # shapes or names that do not match config.yaml
            raise CheckpointError(f"{path / WEIGHTS_FILE}: the weights do not match {CONFIG_FILE} "
                                  f"({one_line(e)})") from None
        return model.eval()

    @classmethod
    def from_laion(cls, path: str | Path, max_length: int = 77, text_tower: bool = True) -> "ClapModel":
        """Build `htsat-tiny-roberta` from a transformers LAION-CLAP folder (clap_core.model.laion reads it);
        returns the model in eval mode. Also `clap_core.import_laion_clap(path)`. text_tower=False: the audio
        side only (the folder is read whole, then the text tower dropped)."""
        from clap_core.model.laion import read_laion_folder  # transformers' CLAP classes load only when asked

        folder = read_laion_folder(path, max_length)
        model = cls(folder.config, tokenizer=folder.tokenizer)
        # Only learnable tensors must match: RoBERTa's position/token-type id buffers may differ in persistence.
        ours = model.state_dict()
        buffers = {name for name, _ in model.named_buffers()} | {n for n in folder.state if n.endswith("_ids")}
        missing = [n for n, _ in model.named_parameters() if n not in folder.state]
        unexpected = [n for n in folder.state if n not in ours and n not in buffers]
        if missing or unexpected:
            raise ValueError(f"LAION-CLAP import mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.load_state_dict({n: t for n, t in folder.state.items() if n in ours}, strict=False)
        if not text_tower:
            model.tokenizer = model.text_encoder = model.text_projection = None
        return model.eval()


def read_weights(file: Path, expected: dict[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file named in `expected` (a state_dict), read one by one: the file's other
    tensors are never read. A name the file lacks raises as load_state_dict would (RuntimeError)."""
    with safe_open(str(file), framework="pt", device=str(device)) as weights:
        missing = sorted(set(expected) - set(weights.keys()))
        if missing:
            raise RuntimeError(f"missing key(s) in the file: {', '.join(missing[:5])}")
        return {name: weights.get_tensor(name) for name in expected}
