"""Whisper's encoder (Radford et al. 2022) as a CLAP audio tower, through transformers' `WhisperEncoder`.

    tower = WhisperAudioEncoder(sample_rate=48_000, hf_config={"d_model": 64, ...})   # offline, random init
    tower = WhisperAudioEncoder(sample_rate=48_000, pretrained="models/whisper-base")  # a local WhisperModel folder
    feats = tower(waves, lengths)     # (B, N) at 48 kHz, (B,) real samples -> (B, d_model)

Front end: resample to 16 kHz, then `WhisperFeatureExtractor`'s log-mel reproduced in torch on the model's
device (400-point STFT, hop 160, Slaney mel filters up to 8 kHz, log10, floor at the clip's max - 8, then
(x + 4) / 4), computed over the model's whole window (audio.clip_seconds) with zero padding, as the
extractor pads to 30 s.

Length. transformers' `WhisperEncoder.forward` insists on exactly max_source_positions * 2 mel frames
(3000: 30 s). This tower runs the same modules (conv1, conv2, positions, layers, final norm) itself on
shorter inputs, using the first T positional embeddings, so a 10 s window costs a third of 30 s. With
`mask_padding` (default) the batch is also cropped to its longest real clip (plus the frames the two
convolutions look at) and self-attention masks the padding frames: a short clip costs what it is, and its
embedding does not depend on its batch. Without it, every clip sees the whole window and its zero-padding
frames, as the original model does.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import WhisperConfig, WhisperModel
from transformers.audio_utils import mel_filter_bank
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from clap_core.model.encoders.speech import (
    LayerMix,
    MaskedPooling,
    Resampler,
    SpeechTower,
    architecture_config,
    check_inputs,
    layer_drop_mask,
    length_mask,
    zero3_partitioned,
)

BACKBONE_RATE = 16_000  # Whisper's log-mel is computed at 16 kHz
N_FFT, HOP = 400, 160  # 25 ms window, 10 ms hop: 100 mel frames per second
CONV_CONTEXT = 4  # extra mel frames kept after the longest clip: conv1 + conv2 look 2 frames ahead


def build_whisper_encoder(pretrained: str | None, hf_config: dict[str, Any]) -> WhisperEncoder:
    """The encoder of a WhisperModel folder / hub name, or built offline (random init) from config kwargs."""
    if pretrained:
        return WhisperModel.from_pretrained(pretrained).get_encoder()  # the decoder is dropped with the model
    kwargs = dict(hf_config)
    model_type = kwargs.pop("model_type", "whisper")
    if model_type != "whisper":
        raise ValueError(f"audio_encoder.hf_config.model_type must be 'whisper', got '{model_type}'")
    return WhisperEncoder(WhisperConfig(**kwargs))


class WhisperLogMel(nn.Module):
    """16 kHz waves (B, N) + lengths (B,) -> log-mel (B, n_mels, N // 160) exactly as WhisperFeatureExtractor."""

    def __init__(self, n_mels: int):
        super().__init__()
        filters = mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=n_mels, min_frequency=0.0,
                                  max_frequency=8000.0, sampling_rate=BACKBONE_RATE, norm="slaney",
                                  mel_scale="slaney")  # (F, n_mels)
        self.register_buffer("filters", torch.from_numpy(filters).float().T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=waves.device.type, enabled=False):  # log10 of bf16 power loses bins
            waves = waves.float() * length_mask(lengths, waves.shape[1])  # the extractor pads with zeros
            stft = torch.stft(waves, N_FFT, HOP, window=self.window, return_complex=True)  # (B, F, N // 160 + 1)
            power = stft[..., :-1].abs() ** 2  # the extractor drops the last frame
            log_spec = torch.clamp(self.filters @ power, min=1e-10).log10()  # (B, n_mels, T)
            floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0
            return (torch.maximum(log_spec, floor) + 4.0) / 4.0


class WhisperAudioEncoder(SpeechTower):
    """Waveforms (B, N) at `sample_rate` + real lengths (B,) -> pooled features (B, d_model)."""

    takes_waveform = True  # ClapModel gives this tower the fixed-window waveforms, not log-mel
    backbone_name = "encoder"  # the submodule holding transformers' pretrained weights (lr_pretrained applies)

    def __init__(self, sample_rate: int = 48_000, pretrained: str | None = None,
                 hf_config: dict[str, Any] | None = None, pooling: str = "mean", layers: str = "last",
                 mask_padding: bool = True, gradient_checkpointing: bool = False, layerdrop: float | None = None):
        super().__init__()
        self.encoder = build_whisper_encoder(pretrained, hf_config or {})
        config = self.encoder.config
        if layerdrop is not None:
            config.encoder_layerdrop = layerdrop
        self.layerdrop = config.encoder_layerdrop
        self.mask_padding = mask_padding
        self.gradient_checkpointing = gradient_checkpointing
        self.resampler = Resampler(sample_rate, BACKBONE_RATE)
        self.logmel = WhisperLogMel(config.num_mel_bins)
        self.mix = LayerMix(config.encoder_layers + 1, layers)  # the first layer's input + every layer
        self.pool = MaskedPooling(config.d_model, pooling)
        self.out_dim = config.d_model

    def resolved_config(self) -> dict[str, Any]:
        """Config fields that rebuild this tower offline (save_pretrained inlines them; weights come separately)."""
        return {"pretrained": None, "hf_config": {"model_type": "whisper", **architecture_config(self.encoder.config)},
                "layerdrop": self.layerdrop}

    def _states(self, waves: torch.Tensor, lengths: torch.Tensor | None,
                all_layers: bool) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
        lengths = check_inputs(waves, lengths)
        waves, lengths = self.resampler(waves, lengths)  # (B, N16), (B,)
        mel = self.logmel(waves, lengths)  # (B, n_mels, T) over the whole window
        mel_frames = torch.div(lengths + HOP - 1, HOP, rounding_mode="floor").clamp(max=mel.shape[2])  # (B,)
        if self.mask_padding:
            keep = min(mel.shape[2], int(mel_frames.max()) + CONV_CONTEXT)
            mel = mel[:, :, :keep + keep % 2]  # even: conv2 halves it
        else:
            mel_frames = torch.full_like(mel_frames, mel.shape[2])  # every window frame is input, as in Whisper
        return self.hidden_states(mel, mel_frames, all_layers)

    def hidden_states(self, mel: torch.Tensor, mel_frames: torch.Tensor | None = None,
                      all_layers: bool = True) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
        """Log-mel (B, n_mels, T) + real frames (B,) -> hidden states (each (B, ceil(T/2), d)) and their mask.

        The modules and order of transformers' WhisperEncoder.forward, on T <= 2 * max_source_positions
        frames (the first positional embeddings), and masked self-attention where `mel_frames` < T.
        """
        enc = self.encoder
        if mel.shape[2] > 2 * enc.config.max_source_positions:
            raise ValueError(f"{mel.shape[2]} mel frames exceed Whisper's {2 * enc.config.max_source_positions} "
                             f"({enc.config.max_source_positions / 50:g} s): lower audio.clip_seconds")
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)  # (B, T', d)
        x = x + enc.embed_positions(torch.arange(x.shape[1], device=x.device))  # a module call: ZeRO-3 gathers it
        x = F.dropout(x, p=enc.dropout, training=self.training)
        frames = torch.full((mel.shape[0],), x.shape[1], device=mel.device) if mel_frames is None \
            else torch.div(mel_frames + 1, 2, rounding_mode="floor")  # conv2: stride 2
        mask = length_mask(frames, x.shape[1])  # (B, T')
        attn = create_bidirectional_mask(config=enc.config, inputs_embeds=x, attention_mask=mask) \
            if not bool(mask.all()) else None
        states = [x]
        drop = [False] * len(enc.layers)
        if self.training and self.layerdrop > 0.0 and not zero3_partitioned(enc):
            drop = layer_drop_mask(len(enc.layers), self.layerdrop, x.device)
        for layer, skip in zip(enc.layers, drop):
            if skip:
                states.append(x)  # a dropped layer passes its input on (LayerDrop)
                continue
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, attn, use_reentrant=False)
            else:
                x = layer(x, attn)
            states.append(x)
        states[-1] = enc.layer_norm(x)  # the final norm closes the last layer, as transformers' hidden_states
        return (states if all_layers else states[-1:]), mask
