"""Shard rows -> model-ready numpy batches: decode FLAC, crop or pad to one length, tokenize a caption.

    transform = PairBatchTransform.for_model(model_config)
    batch = transform({"audio": flac_bytes_array, "captions": caption_lists})
    batch["waves"]           # (B, N) float32, N = clip samples; short clips zero-padded
    batch["lengths"]         # (B,) int64 real samples per row (the model repeat-pads short clips itself)
    batch["input_ids"]       # (B, max_length) int64, padded to max_length so batches stack
    batch["attention_mask"]  # (B, max_length) int64

Runs inside Ray Data tasks, so it is a plain picklable callable: the tokenizer is built on first use
in each process and never pickled. Training draws a random crop and a random caption (one of
`captions`) on every call, so each epoch sees other crops and captions; eval takes the centre crop
and the main caption.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from clap_core.audio_io import decode_flac
from clap_core.model_config import ClapModelConfig


def crop_or_pad(wave: np.ndarray, length: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    """(N,) -> (length,) float32 and the real length: a random window (rng) or the centre one; zero-pad short clips."""
    n = wave.shape[0]
    if n >= length:
        start = int(rng.integers(0, n - length + 1)) if rng is not None else (n - length) // 2
        return wave[start:start + length], length
    out = np.zeros(length, dtype=np.float32)
    out[:n] = wave
    return out, n


def decode_waves(audio: Sequence[bytes], length: int,
                 rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """FLAC bytes -> (B, length) float32 mono waves and (B,) int64 real lengths."""
    waves = np.zeros((len(audio), length), dtype=np.float32)
    lengths = np.zeros(len(audio), dtype=np.int64)
    for i, data in enumerate(audio):
        wave, _ = decode_flac(data)  # (C, N) at the shard rate (48 kHz)
        mono = wave.mean(axis=0) if wave.shape[0] > 1 else wave[0]
        waves[i], lengths[i] = crop_or_pad(mono, length, rng)
    return waves, lengths


def pick_captions(captions: Sequence[Any], fallback: Sequence[str] | None,
                  rng: np.random.Generator | None) -> list[str]:
    """One caption per row: random among the row's `captions` in training, the first (main) one in eval."""
    out = []
    for i, options in enumerate(captions):
        options = [str(c) for c in options] if options is not None else []
        if not options:
            options = [str(fallback[i])] if fallback is not None else [""]
        out.append(options[int(rng.integers(len(options)))] if rng is not None else options[0])
    return out


class PairBatchTransform:
    """Callable dict[str, np.ndarray] -> dict[str, np.ndarray] for `Dataset.map_batches(batch_format="numpy")`."""

    def __init__(self, clip_samples: int, tokenizer: str, max_length: int, training: bool = True,
                 seed: int | None = None):
        self.clip_samples = clip_samples
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.training = training
        self.seed = seed
        self._tokenizer = None
        self._rng: np.random.Generator | None = None

    @classmethod
    def for_model(cls, config: ClapModelConfig, training: bool = True, clip_seconds: float | None = None,
                  seed: int | None = None) -> "PairBatchTransform":
        seconds = clip_seconds or config.audio.clip_seconds
        return cls(int(round(seconds * config.audio.sample_rate)), config.text_encoder.tokenizer,
                   config.text_encoder.max_length, training, seed)

    def __getstate__(self) -> dict:
        # Ship the settings, not the tokenizer or the RNG: each process builds its own.
        return {**self.__dict__, "_tokenizer": None, "_rng": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from clap_core.encoders.text import build_tokenizer
            self._tokenizer = build_tokenizer(self.tokenizer_name, self.max_length)
        return self._tokenizer

    def rng(self) -> np.random.Generator | None:
        if not self.training:
            return None
        if self._rng is None:
            # seed=None: fresh entropy per process, so epochs and Ray Data tasks differ.
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="np")
        return {"input_ids": tokens["input_ids"].astype(np.int64),
                "attention_mask": tokens["attention_mask"].astype(np.int64)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = self.rng()
        waves, lengths = decode_waves(batch["audio"], self.clip_samples, rng)
        captions = batch.get("captions", batch.get("caption"))
        if "captions" not in batch:
            captions = [[c] for c in captions]
        texts = pick_captions(captions, batch.get("caption"), rng)
        return {"waves": waves, "lengths": lengths, **self.tokenize(texts)}


def trim_padding(input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
    """Drop the all-padding tail columns of a (B, L) token batch (numpy or torch): shorter attention, same result."""
    width = max(int(attention_mask.sum(1).max()), 1)
    return input_ids[:, :width], attention_mask[:, :width]
