"""Shard rows -> model-ready numpy batches: decode FLAC, crop or pad to one length, tokenize a caption.

    transform = PairBatchTransform.for_model(model_config)
    batch = transform({"audio": flac_bytes_array, "captions": caption_lists})
    batch["waves"]           # (B, N) float32, N = clip samples; short clips zero-padded
    batch["lengths"]         # (B,) int64 real samples per row (the model repeat-pads short clips itself)
    batch["input_ids"]       # (B, max_length) int64, padded to max_length so batches stack
    batch["attention_mask"]  # (B, max_length) int64
    batch["clip_key"]        # (B,) int64 key of each row's source clip (given an "id" column; see clip_keys)

Runs inside Ray Data tasks, so it is a plain picklable callable. It tokenizes with the model's tokenizer's
fast backend alone (FixedLengthTokens: the `tokenizers` library, shipped as JSON), so a decode task loads
neither transformers nor torch (which transformers' tokenizers import): ~5 s of CPU less to start each task
process on 2 cores, and ~0.4 GB less memory in each. Training draws a random crop and a random caption (one of
`captions`) on every call, so each epoch sees other crops and captions; eval takes the centre crop
and the main caption.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from clap_core.audio.clips import crop_or_pad
from clap_core.audio.codec import decode_audio
from clap_core.data.rejects import failure_reject, write_rejects
from clap_core.data.shards import source_clip_id
from clap_core.model.config import ClapModelConfig

SHARD_CLIP_MAX_SECONDS = 600.0  # a shard row decoding past this is rejected (too_long): bounds a task's memory


def decode_rows(audio: Sequence[bytes], length: int,
                rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, dict[int, BaseException]]:
    """FLAC bytes -> (B', length) float32 mono waves and (B',) int64 real lengths of the rows that decode,
    and {row index: exception} for those that do not (B' = B - len(failures)). Never raises on bad bytes."""
    waves, lengths, failures = [], [], {}
    for i, data in enumerate(audio):
        try:  # streamed, bounded decode: a lying header or a huge row cannot take the task's memory
            wave, _ = decode_audio(data, mono=True, target_sr=None, max_seconds=SHARD_CLIP_MAX_SECONDS)  # (1, N)
        except Exception as e:  # a bad row is skipped and reported by the caller, never retried
            failures[i] = e
            continue
        wave, n = crop_or_pad(wave[0], length, rng)
        waves.append(wave)
        lengths.append(n)
    return (np.stack(waves) if waves else np.zeros((0, length), np.float32),
            np.array(lengths, dtype=np.int64), failures)


def decode_waves(audio: Sequence[bytes], length: int,
                 rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """FLAC bytes -> (B, length) float32 mono waves and (B,) int64 real lengths; raises on the first bad row."""
    waves, lengths, failures = decode_rows(audio, length, rng)
    if failures:
        raise next(iter(failures.values()))
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


class FixedLengthTokens:
    """Texts -> {"input_ids", "attention_mask"}: (B, max_length) int64 each, through a fast tokenizer's backend
    (the `tokenizers` library only), exactly as `tokenizer(texts, padding="max_length", truncation=True,
    max_length=max_length)` gives them (tests/unit/train/test_batching.py compares the two). Built from the
    transformers tokenizer where that is loaded (the driver); pickled as the backend's JSON."""

    def __init__(self, backend_json: str, max_length: int):
        self.backend_json = backend_json  # the backend with its truncation and padding to max_length set
        self.max_length = max_length
        self._backend = None

    @classmethod
    def from_tokenizer(cls, tokenizer, max_length: int) -> "FixedLengthTokens | None":
        """From a transformers tokenizer; None for a slow (Python) one, which has no backend to ship."""
        if not getattr(tokenizer, "is_fast", False):
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: the model's is left alone
        # what transformers sets before each call with these arguments (stride 0, longest_first)
        backend.enable_truncation(max_length, direction=tokenizer.truncation_side)
        backend.enable_padding(length=max_length, direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                               pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token)
        return cls(backend.to_str(), max_length)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_backend": None}  # the JSON travels; each process parses it once

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self._backend is None:
            from tokenizers import Tokenizer
            self._backend = Tokenizer.from_str(self.backend_json)
        encodings = self._backend.encode_batch(list(texts))
        shape = (len(encodings), self.max_length)
        return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64).reshape(shape),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(shape)}


class PairBatchTransform:
    """Callable dict[str, np.ndarray] -> dict[str, np.ndarray] for `Dataset.map_batches(batch_format="numpy")`."""

    def __init__(self, clip_samples: int, tokenizer: str, max_length: int, training: bool = True,
                 seed: int | None = None, rejects_uri: str | None = None, tokens: FixedLengthTokens | None = None):
        self.rejects_uri = rejects_uri  # folder for the reject records of rows that do not decode
        self.clip_samples = clip_samples
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.training = training
        self.seed = seed
        self.tokens = tokens  # the tokenizer's backend (ship_tokenizer); None: the transformers tokenizer, built on use
        self._tokenizer = None
        self._rng: np.random.Generator | None = None

    @classmethod
    def for_model(cls, config: ClapModelConfig, training: bool = True, clip_seconds: float | None = None,
                  seed: int | None = None) -> "PairBatchTransform":
        seconds = clip_seconds or config.audio.clip_seconds
        return cls(int(round(seconds * config.audio.sample_rate)), config.text_encoder.tokenizer,
                   config.text_encoder.max_length, training, seed)

    def ship_tokenizer(self) -> "PairBatchTransform":
        """Builds the tokenizer here, in the driver (a missing tokenizer folder fails now, not in a Ray Data
        task), and keeps its backend for the tasks, which then load neither transformers nor torch."""
        self.tokens = FixedLengthTokens.from_tokenizer(self.tokenizer, self.max_length)
        return self

    def __getstate__(self) -> dict:
        # Ship the settings, not the tokenizer or the RNG: each process builds its own.
        return {**self.__dict__, "_tokenizer": None, "_rng": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from clap_core.model.encoders.text import build_tokenizer
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
        if self.tokens is not None:
            return self.tokens(texts)
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="np")
        return {"input_ids": tokens["input_ids"].astype(np.int64),
                "attention_mask": tokens["attention_mask"].astype(np.int64)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of the rows that decode; the others are written to rejects_uri (see report_failures)."""
        rng = self.rng()
        waves, lengths, failures = decode_rows(batch["audio"], self.clip_samples, rng)
        if failures:
            self.report_failures(batch, failures)
        keep = [i for i in range(len(batch["audio"])) if i not in failures]
        captions = batch.get("captions", batch.get("caption"))
        if "captions" not in batch:
            captions = [[c] for c in captions]
        fallback = batch.get("caption")
        texts = pick_captions([captions[i] for i in keep], None if fallback is None else [fallback[i] for i in keep],
                              rng)
        keys = {"clip_key": clip_keys([batch["id"][i] for i in keep])} if "id" in batch else {}
        if not keep:
            empty = np.zeros((0, self.max_length), np.int64)
            return {"waves": waves, "lengths": lengths, "input_ids": empty, "attention_mask": empty, **keys}
        return {"waves": waves, "lengths": lengths, **self.tokenize(texts), **keys}

    def report_failures(self, batch: dict[str, np.ndarray], failures: dict[int, BaseException]) -> None:
        """One reject record per bad row (id, and "<shard path>" as source_path), each in its own Parquet file
        named by the row: a row read again in a later pass, whatever rows share its batch then, rewrites the same
        file, so the files count distinct bad rows (check_bad_rows). Files stay few: past
        data.max_bad_row_fraction of the rows the run stops."""
        records = []
        for i, exc in failures.items():
            row = {"id": str(batch["id"][i]) if "id" in batch else f"row-{i}",
                   "source_path": str(batch["path"][i]) if "path" in batch else ""}
            records.append(failure_reject(row, exc))
        import warnings
        for r in records:
            warnings.warn(f"skipped an undecodable training row: shard {r['source_path']} id {r['id']}: "
                          f"{r['reason']}: {r['detail'][:200]}")
            if self.rejects_uri:
                write_rejects(self.rejects_uri, [r])


def clip_keys(ids: Sequence[str]) -> np.ndarray:
    """(B,) int64 keys of the rows' source clips: equal for a clip and its augmented copies (shards.source_clip_id),
    the same in every process (blake2b, not Python's salted hash). The training feed keeps rows of one key out of
    the same batch: in a contrastive batch a second copy of a clip is a false negative."""
    return np.array([int.from_bytes(hashlib.blake2b(source_clip_id(str(i)).encode(), digest_size=8).digest(),
                                    "little", signed=True) for i in ids], dtype=np.int64).reshape(len(ids))


def trim_padding(input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
    """Drop the all-padding tail columns of a (B, L) token batch (numpy or torch): shorter attention, same result."""
    width = max(int(attention_mask.sum(1).max()), 1)
    return input_ids[:, :width], attention_mask[:, :width]

