"""What the speech towers (wav2vec 2.0, Whisper) share: resampling, frame masks, pooling, layer mixing.

A speech tower takes the front end's fixed-window waveforms (B, N) at the shard rate (48 kHz) and the
number of real samples of each clip (B,), resamples to the backbone's 16 kHz on the model's device, and
pools its frames with the padding masked. Which hidden layer is pooled is a config choice: the last one,
or a learned softmax-weighted sum of all of them (SUPERB's recipe: emotion and speaker information live in
the middle layers of self-supervised speech models, not the last).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torchaudio

# transformers config keys that describe a saved file or a run, not the architecture
HF_META_KEYS = {"architectures", "transformers_version", "torch_dtype", "dtype", "return_dict",
                "output_hidden_states", "output_attentions", "use_cache", "is_decoder", "add_cross_attention",
                "tie_word_embeddings", "chunk_size_feed_forward", "problem_type", "id2label", "label2id"}


def architecture_config(hf_config: Any) -> dict:
    """A transformers config -> the kwargs that rebuild it offline (`Config(**kwargs)`), meta keys dropped."""
    full = json.loads(hf_config.to_json_string(use_diff=False))
    return {k: v for k, v in full.items() if not k.startswith("_") and k not in HF_META_KEYS}


class Resampler(nn.Module):
    """(B, N) at `orig` Hz -> (B, ceil(N * new / orig)) at `new` Hz; windowed sinc, runs on the input's device."""

    def __init__(self, orig: int, new: int):
        super().__init__()
        self.orig, self.new = orig, new
        self.resample = torchaudio.transforms.Resample(orig, new) if orig != new else nn.Identity()
        for module in self.modules():  # the kernel follows from the two rates: keep it out of checkpoints
            module._non_persistent_buffers_set.update(module._buffers)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.orig == self.new:
            return waves, lengths
        with torch.autocast(device_type=waves.device.type, enabled=False):
            out = self.resample(waves.float())  # (B, N')
        new_lengths = torch.div(lengths * self.new + self.orig - 1, self.orig, rounding_mode="floor")
        return out, new_lengths.clamp(max=out.shape[1])


def zero3_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions this module's parameters: then every rank must run every layer
    (gathering a layer is a collective), so LayerDrop is off, as transformers does under ZeRO-3."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def layer_drop_mask(num_layers: int, p: float, device: torch.device) -> list[bool]:
    """Which layers LayerDrop skips this step, the same on every rank.

    Drawn from the global RNG (so a gradient-cache replay, which restores it, redraws the same) on rank 0 and
    broadcast: ranks that skipped different layers would reduce different gradients and hang DDP / ZeRO.
    """
    drop = (torch.rand(num_layers) < p).to(torch.uint8)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        drop = drop.to(device)
        dist.broadcast(drop, src=0)
    return [bool(d) for d in drop.tolist()]


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) valid lengths -> (B, size) bool mask, True on real positions."""
    return torch.arange(size, device=lengths.device)[None] < lengths[:, None]


class LayerMix(nn.Module):
    """Hidden states of every layer -> one (B, T, H): the last layer, or a learned softmax-weighted sum."""

    def __init__(self, num_states: int, mode: str):
        super().__init__()
        if mode not in ("last", "weighted"):
            raise ValueError(f"layers must be 'last' or 'weighted', got '{mode}'")
        self.mode = mode
        # zeros: the sum starts as the plain average of all layers, as in SUPERB
        self.weights = nn.Parameter(torch.zeros(num_states)) if mode == "weighted" else None

    def forward(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.mode == "last":
            return states[-1]
        if len(states) != self.weights.shape[0]:
            raise ValueError(f"expected {self.weights.shape[0]} hidden states, got {len(states)}")
        w = self.weights.softmax(0).to(states[0].dtype)  # (L,)
        return torch.einsum("l,lbth->bth", w, torch.stack(list(states)))  # (B, T, H)


class MaskedPooling(nn.Module):
    """Frames (B, T, H) + mask (B, T) -> (B, H): mean over real frames, or attention pooling (one learned query)."""

    def __init__(self, hidden: int, mode: str):
        super().__init__()
        if mode not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got '{mode}'")
        self.mode = mode
        self.score = nn.Linear(hidden, 1) if mode == "attention" else None

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            m = mask.unsqueeze(-1).to(frames.dtype)  # (B, T, 1)
            return (frames * m).sum(1) / m.sum(1).clamp(min=1.0)
        scores = self.score(frames).squeeze(-1).float()  # (B, T)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(1).to(frames.dtype)  # (B, T); a clip has >= 1 real frame
        return torch.einsum("bt,bth->bh", weights, frames)


class SpeechTower(nn.Module):
    """What every speech tower shares: pool the (mixed) hidden states over real frames. A subclass provides
    `mix` (LayerMix), `pool` (MaskedPooling) and `_states(waves, lengths, all_layers) -> (states, mask)`."""

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        states, mask = self._states(waves, lengths, all_layers=self.mix.mode == "weighted")
        return self.pool(self.mix(states), mask)  # (B, H)

    def layer_features(self, waves: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Every hidden layer pooled on its own: (B, layers + 1, H), for layer-wise probes."""
        states, mask = self._states(waves, lengths, all_layers=True)
        return torch.stack([self.pool(s, mask) for s in states], dim=1)


def check_inputs(waves: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Valid lengths (B,) on the waves' device; all samples are real when `lengths` is None."""
    if waves.ndim != 2:
        raise ValueError(f"speech towers take waveforms (batch, samples), got shape {tuple(waves.shape)}")
    if lengths is None:
        return torch.full((waves.shape[0],), waves.shape[1], dtype=torch.long, device=waves.device)
    lengths = lengths.to(waves.device).long()
    if int(lengths.min()) < 1 or int(lengths.max()) > waves.shape[1]:
        raise ValueError(f"lengths must lie in [1, {waves.shape[1]}], got [{int(lengths.min())}, {int(lengths.max())}]")
    return lengths
