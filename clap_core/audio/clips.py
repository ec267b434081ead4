"""Fitting numpy waveforms to a window: the one home of crop, pad, loop and split on the host side.

    wave, n = crop_or_pad(wave, 480_000, rng)      # training batches: a random (or centre) window, zero-padded
    env = loop_to_length(env, speech.shape[1])     # environmental mixes: loop or cut the partner to the speech
    parts = split_windows(wave, 480_000)           # long-clip inference: consecutive windows covering the clip

The model's own crop/pad of tensors inside the forward pass (random in training, repeat-padding as LAION
does) is `clap_core.model.frontend.crop_or_pad_tensor`; the preprocess segmenter cuts a decoding stream of
unknown length (`clap_core.preprocess`), so neither lives here.
"""
from __future__ import annotations

import numpy as np


def crop_or_pad(wave: np.ndarray, length: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    """(N,) -> (length,) float32 and the real length: a random window (rng) or the centre one; zero-pad short clips."""
    n = wave.shape[0]
    if n >= length:
        start = int(rng.integers(0, n - length + 1)) if rng is not None else (n - length) // 2
        return wave[start:start + length], length
    out = np.zeros(length, dtype=np.float32)
    out[:n] = wave
    return out, n


def loop_to_length(wave: np.ndarray, length: int) -> np.ndarray:
    """(C, M) -> (C, length): repeat the clip end to end as often as needed, then cut (a short partner loops)."""
    reps = -(-length // wave.shape[1])  # ceil(length / M)
    return np.tile(wave, (1, reps))[:, :length]


def split_windows(wave: np.ndarray, window: int) -> list[np.ndarray]:
    """(N,) -> consecutive (window,) views covering the clip; the last one is aligned to the end so none is mostly
    padding (it overlaps its neighbour instead). A clip of at most `window` samples is one (N,) piece."""
    if len(wave) <= window:
        return [wave]
    starts = list(range(0, len(wave) - window + 1, window))
    if starts[-1] + window < len(wave):
        starts.append(len(wave) - window)
    return [wave[s:s + window] for s in starts]
