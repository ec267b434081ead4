"""wav2vec 2.0 (Baevski et al. 2020) as a CLAP audio tower, through transformers' `Wav2Vec2Model`.

    tower = Wav2Vec2Encoder(sample_rate=48_000, hf_config={"hidden_size": 64, ...})   # offline, random init
    tower = Wav2Vec2Encoder(sample_rate=48_000, pretrained="models/wav2vec2-base")    # a local pretrained folder
    feats = tower(waves, lengths)     # (B, N) at 48 kHz, (B,) real samples -> (B, hidden_size)

The front end does what `Wav2Vec2FeatureExtractor` does, in torch on the model's device: resample to
16 kHz, then (when the extractor's `do_normalize` says so) zero-mean unit-variance per clip over its real
samples, padding set to 0. Whether the attention mask is passed follows the extractor too
(`return_attention_mask`, true for the layer-norm checkpoints such as wav2vec2-large-lv60 and XLS-R):
group-norm checkpoints (wav2vec2-base) were trained on unmasked zero padding, so they get the fixed window
(their GroupNorm sees the padding, so cropping would make a clip's embedding depend on its batch), while
masked checkpoints get the batch cropped to its longest clip: short clips cost what they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

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

BACKBONE_RATE = 16_000  # wav2vec 2.0 and its fine-tunes are trained on 16 kHz audio


def build_wav2vec2(pretrained: str | None, hf_config: dict[str, Any]) -> Wav2Vec2Model:
    """Wav2Vec2Model from a local folder / hub name, or built offline (random init) from config kwargs."""
    if pretrained:
        return Wav2Vec2Model.from_pretrained(pretrained)
    kwargs = dict(hf_config)
    model_type = kwargs.pop("model_type", "wav2vec2")
    if model_type != "wav2vec2":
        raise ValueError(f"audio_encoder.hf_config.model_type must be 'wav2vec2', got '{model_type}'")
    return Wav2Vec2Model(Wav2Vec2Config(**kwargs))


def extractor_settings(pretrained: str | None, backbone: Wav2Vec2Model) -> tuple[bool, bool]:
    """(do_normalize, return_attention_mask) from the folder's preprocessor_config.json, else the usual defaults."""
    if pretrained and (Path(pretrained) / "preprocessor_config.json").is_file():
        fe = Wav2Vec2FeatureExtractor.from_pretrained(pretrained)
        return bool(fe.do_normalize), bool(fe.return_attention_mask)
    return True, backbone.config.feat_extract_norm == "layer"


def zero_mean_unit_var(waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N): each clip normalised over its real samples, padding zeroed (Wav2Vec2FeatureExtractor)."""
    mask = length_mask(lengths, waves.shape[1]).to(waves.dtype)  # (B, N)
    n = lengths.to(waves.dtype)[:, None]  # (B, 1)
    mean = (waves * mask).sum(1, keepdim=True) / n
    var = (((waves - mean) * mask) ** 2).sum(1, keepdim=True) / n  # population variance, as numpy's var
    return (waves - mean) / torch.sqrt(var + 1e-7) * mask


class Wav2Vec2Encoder(SpeechTower):
    """Waveforms (B, N) at `sample_rate` + real lengths (B,) -> pooled features (B, hidden_size)."""

    takes_waveform = True  # ClapModel gives this tower the fixed-window waveforms, not log-mel
    backbone_name = "backbone"  # the submodule holding transformers' pretrained weights (lr_pretrained applies)

    def __init__(self, sample_rate: int = 48_000, pretrained: str | None = None,
                 hf_config: dict[str, Any] | None = None, do_normalize: bool | None = None,
                 attention_mask: bool | None = None, pooling: str = "mean", layers: str = "last",
                 freeze_feature_encoder: bool = True, gradient_checkpointing: bool = False,
                 layerdrop: float | None = None):
        super().__init__()
        self.backbone = build_wav2vec2(pretrained, hf_config or {})
        default_norm, default_mask = extractor_settings(pretrained, self.backbone)
        self.do_normalize = default_norm if do_normalize is None else do_normalize
        self.uses_attention_mask = default_mask if attention_mask is None else attention_mask
        # LayerDrop is ours (layer_drop_mask: the same layers on every rank); transformers' own draw is per rank
        self.layerdrop = self.backbone.config.layerdrop if layerdrop is None else layerdrop
        self.backbone.config.layerdrop = 0.0
        if freeze_feature_encoder:
            self.backbone.freeze_feature_encoder()
        if gradient_checkpointing:
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.resampler = Resampler(sample_rate, BACKBONE_RATE)
        num_states = self.backbone.config.num_hidden_layers + 1  # the transformer's input + every layer
        self.mix = LayerMix(num_states, layers)
        self.pool = MaskedPooling(self.backbone.config.hidden_size, pooling)
        self.out_dim = self.backbone.config.hidden_size

    def resolved_config(self) -> dict[str, Any]:
        """Config fields that rebuild this tower offline (save_pretrained inlines them; weights come separately)."""
        return {"pretrained": None, "hf_config": {"model_type": "wav2vec2", **architecture_config(self.backbone.config)},
                "do_normalize": self.do_normalize, "attention_mask": self.uses_attention_mask,
                "layerdrop": self.layerdrop}

    def _states(self, waves: torch.Tensor, lengths: torch.Tensor | None,
                all_layers: bool) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
        lengths = check_inputs(waves, lengths)
        waves, lengths = self.resampler(waves, lengths)  # (B, N16), (B,)
        if self.uses_attention_mask:  # padding is masked everywhere: drop what no clip needs
            waves = waves[:, :int(lengths.max())]
        return self.hidden_states(waves, lengths, all_layers)

    def hidden_states(self, waves: torch.Tensor, lengths: torch.Tensor,
                      all_layers: bool = True) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
        """16 kHz waves (B, N) + lengths (B,) -> hidden states (each (B, T, H)) and the real-frame mask (B, T).

        All layers: transformers' `hidden_states` (the first layer's input, then every layer's output),
        recorded with hooks so that a layer skipped by LayerDrop passes its input on and the weighted sum
        always sees num_hidden_layers + 1 states. Otherwise: `last_hidden_state` alone (after the final
        norm in the stable-layer-norm variant).
        """
        sample_mask = length_mask(lengths, waves.shape[1])  # (B, N)
        values = zero_mean_unit_var(waves, lengths) if self.do_normalize else waves * sample_mask
        mask_arg = sample_mask.long() if self.uses_attention_mask else None
        if not all_layers:
            states = (self._run_backbone(values, mask_arg).last_hidden_state,)
        else:
            layers = self.backbone.encoder.layers
            seen: dict[int, torch.Tensor] = {}
            hooks = [self.backbone.encoder.dropout.register_forward_hook(_recorder(seen, -1))]  # the layers' input
            hooks += [layer.register_forward_hook(_recorder(seen, i)) for i, layer in enumerate(layers)]
            try:
                self._run_backbone(values, mask_arg)
            finally:
                for hook in hooks:
                    hook.remove()
            states = [seen[-1]]
            for i in range(len(layers)):
                states.append(seen.get(i, states[-1]))
        frames = self.backbone._get_feat_extract_output_lengths(lengths)  # (B,)
        return states, length_mask(frames, states[-1].shape[1])

    def _run_backbone(self, values: torch.Tensor, mask_arg: torch.Tensor | None):
        """The backbone, its encoder holding only the layers LayerDrop keeps this step (none dropped in eval)."""
        encoder = self.backbone.encoder
        if not (self.training and self.layerdrop > 0.0) or zero3_partitioned(self.backbone):
            return self.backbone(values, attention_mask=mask_arg)
        layers = encoder.layers
        drop = layer_drop_mask(len(layers), self.layerdrop, values.device)
        encoder.layers = nn.ModuleList([layer for layer, skip in zip(layers, drop) if not skip])
        try:
            return self.backbone(values, attention_mask=mask_arg)
        finally:
            encoder.layers = layers


def _recorder(seen: dict, index: int):
    def hook(module, args, output):
        seen[index] = output[0] if isinstance(output, tuple) else output
    return hook
