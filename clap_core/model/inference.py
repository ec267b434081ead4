"""Inference helpers behind ClapModel.embed_audio / embed_text / zero_shot / similarity.

Embeddings are deterministic: the model runs in eval mode, long clips are never cropped at random.
A clip longer than the model's window is embedded by feature fusion when the model has it (HTS-AT
fused), otherwise as the renormalised mean of the embeddings of consecutive windows ("window_mean"),
or by its centre window ("center_crop").

precision="auto" (the default) runs the encoders in bf16 where the device has native bf16 (AVX-512 BF16 / AMX
CPUs, Ampere+ GPUs) and in fp32 elsewhere; the log-mel front end always stays fp32. The bf16 path runs a copy
of the model whose encoders and projections hold bf16 weights (bf16_copy), under autocast: autocast alone
casts every fp32 weight again at every call; on CPU its linears multiply by weights packed once for oneDNN
(clap_core.model.packed_linear). On this project's CPU that is ~2.2x faster than fp32 with a cosine >= 0.9999 to
fp32 on decoded clips (README, "Exact or fast inference"). precision="fp32" forces the exact path.
precision="int8" (CPU, opt-in) is the bf16 path with the audio encoder in static int8, compiled ahead of time
once per machine and weights (clap_core.model.int8_tower): 1.4-1.6x the bf16 path, cosine >= 0.999 to fp32.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from clap_core.audio.clips import split_windows
from clap_core.audio.codec import TARGET_SR, decode_audio, resample
from clap_core.eval.metrics import DEFAULT_TEMPLATES, format_templates, zero_shot_classifier, zero_shot_predict
from clap_core.model.packed_linear import pack_linears
from clap_core.runtime import evaluating

if TYPE_CHECKING:
    from clap_core.model.clap import ClapModel

AudioInput = Union[str, "np.ndarray", torch.Tensor]
LongAudio = Literal["auto", "window_mean", "center_crop"]
Precision = Literal["auto", "fp32", "bf16", "int8"]


@lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    try:  # AVX-512 without the BF16 extension emulates bf16 and is slower than fp32
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively, so autocast is a speed-up, on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_native_bf16()


def resolve_precision(precision: Precision, device: torch.device) -> str:
    if precision not in ("auto", "fp32", "bf16", "int8"):
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'int8', got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(model: "ClapModel", precision: Precision):
    """The context the encoders run in: bf16 autocast, or nothing (exact fp32)."""
    if resolve_precision(precision, model.device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)


BF16_COPY = "_bf16_copy"  # the model's __dict__ entry holding (weights' key, bf16 copy): not a submodule


def bf16_copy(model: "ClapModel") -> "ClapModel":
    """A copy of `model` in eval mode whose encoders and projections hold bf16 weights; the log-mel front end
    and speech towers (they compute their own features from the waveform) stay fp32. Cached on the model and
    rebuilt when a weight changed (an optimizer step, load_state_dict or .to() bump a parameter's version or
    move its storage; an assignment through `.data` does neither: call drop_bf16_copy(model) after one).
    """
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = model.__dict__.get(BF16_COPY)
    if cached is not None and cached[0] == key:
        return cached[1]
    model.__dict__.pop(BF16_COPY, None)  # not into the deepcopy, nor the int8 copy made from it
    model.__dict__.pop(INT8_COPY, None)
    towers = [model.audio_projection] + ([model.text_encoder, model.text_projection] if model.has_text_tower else [])
    if not getattr(model.audio_encoder, "takes_waveform", False):
        towers.append(model.audio_encoder)  # encode_mel hands it the fp32 log-mel cast to its dtype
    # The deepcopy takes each of the towers' float tensors already cast (its memo): one pass over the weights and
    # never a second fp32 copy of them. Deepcopy then .to() took 0.8 s against 0.35 s for HTS-AT + RoBERTa-base
    # and peaked at a whole fp32 copy (+614 MB against +307 MB). A tensor two towers share stays shared.
    memo: dict[int, torch.Tensor] = {}
    for tower in towers:
        for tensor in itertools.chain(tower.parameters(), tower.buffers()):
            if tensor.is_floating_point() and id(tensor) not in memo:
                cast = tensor.detach().to(torch.bfloat16)
                memo[id(tensor)] = nn.Parameter(cast, tensor.requires_grad) \
                    if isinstance(tensor, nn.Parameter) else cast
    fast = copy.deepcopy(model, memo).eval()
    pack_linears(fast)  # on CPU each bf16 linear of the towers multiplies by its weight packed once for oneDNN
    model.__dict__[BF16_COPY] = (key, fast)
    return fast


def drop_bf16_copy(model: "ClapModel") -> None:
    """Forget the cached bf16 copy and the int8 copy made from it (their memory, or weights changed in a way
    bf16_copy cannot see)."""
    model.__dict__.pop(BF16_COPY, None)
    model.__dict__.pop(INT8_COPY, None)


def runner(model: "ClapModel", precision: Precision) -> "ClapModel":
    """The model the encoders run on: `model` itself (fp32), its bf16 copy, or for int8 the bf16 copy with the
    compiled int8 audio encoder (int8_copy)."""
    resolved = resolve_precision(precision, model.device)
    if resolved == "fp32":
        return model
    return int8_copy(model) if resolved == "int8" else bf16_copy(model)


INT8_COPY = "_int8_copy"  # the model's __dict__ entry holding (the bf16 copy it was made from, the int8 copy)


def int8_copy(model: "ClapModel") -> "ClapModel":
    """The bf16 copy (bf16_copy) with its audio encoder replaced by the compiled static-int8 one
    (clap_core.model.int8_tower: built from the fp32 weights, once per machine and weights); its text tower and
    projections stay the bf16 copy's. Rebuilt with the bf16 copy, i.e. when a weight changed."""
    from clap_core.model import int8_tower

    int8_tower.check_int8(model)
    fast = bf16_copy(model)
    cached = model.__dict__.get(INT8_COPY)
    if cached is not None and cached[0] is fast:
        return cached[1]
    encoder = int8_tower.compiled_audio_encoder(model)
    int8 = copy.copy(fast)  # shares every module with the bf16 copy but the audio encoder
    int8._modules = {**fast._modules, "audio_encoder": encoder}
    model.__dict__[INT8_COPY] = (fast, int8)
    return int8


def load_waveform(item: AudioInput, sample_rate: int | None) -> np.ndarray:
    """A path (decoded, downmixed, resampled to 48 kHz) or an array at `sample_rate` -> (N,) float32."""
    if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
        wave, _ = decode_audio(item, mono=True, target_sr=TARGET_SR)
        return wave[0]
    wave = np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item, dtype=np.float32)
    if wave.ndim == 2:  # (C, N) -> mono
        wave = wave.mean(axis=0)
    if wave.ndim != 1:
        raise ValueError(f"an audio array must be (samples,) or (channels, samples), got shape {wave.shape}")
    if sample_rate is None:
        raise ValueError("arrays need sample_rate=...: pass the rate they were recorded at")
    return resample(wave[None], sample_rate, TARGET_SR)[0] if sample_rate != TARGET_SR else wave


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def pad_batch(waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (N_i,) -> zero-padded (B, max N) tensor and lengths (B,)."""
    lengths = torch.tensor([len(w) for w in waves])
    out = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        out[i, :len(w)] = torch.from_numpy(np.ascontiguousarray(w))
    return out, lengths


@torch.no_grad()
def embed_waveforms(model: "ClapModel", waves: Sequence[np.ndarray], batch_size: int = 16,
                    long_audio: LongAudio = "auto", precision: Precision = "auto") -> np.ndarray:
    """48 kHz mono waves -> (N, D) unit embeddings, deterministically."""
    mode = long_audio
    if mode == "auto":
        mode = "fusion" if model.config.audio.fusion else "window_mean"
    with evaluating(model), autocast(model, precision):
        encoder = runner(model, precision)
        if mode == "window_mean":
            return _embed_window_mean(encoder, waves, batch_size)
        return _embed_direct(encoder, waves, batch_size)  # fusion or centre crop happen in the front end


def _embed_direct(model: "ClapModel", waves: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    def encode(padded: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
        emb = model.encode_audio(padded, lengths=lengths, normalize=False)  # (b, D), bf16 under autocast
        return F.normalize(emb.float(), dim=-1).cpu().numpy()  # normalised in fp32 either way

    return embed_batches(encode, waves, batch_size, model.config.embed_dim)


def embed_batches(encode: Callable[[torch.Tensor, torch.Tensor], np.ndarray], waves: Sequence[np.ndarray],
                  batch_size: int, dim: int) -> np.ndarray:
    """Waves -> (N, dim): zero-padded batches of `batch_size` (pad_batch) through `encode(padded (b, max N),
    lengths (b,)) -> (b, dim)`; (0, dim) for no waves. ClapModel's and OnnxTowers' audio paths both batch here."""
    out = [encode(*pad_batch(chunk)) for chunk in batched(list(waves), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def _embed_window_mean(model: "ClapModel", waves: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    return window_mean(lambda windows: _embed_direct(model, windows, batch_size), waves, model.frontend.clip_samples)


def window_mean(encode: Callable[[list[np.ndarray]], np.ndarray], waves: Sequence[np.ndarray],
                window: int) -> np.ndarray:
    """Clips -> (N, D): each clip's consecutive windows (split_windows) embedded by `encode` (a list of at most
    window-long waves -> (n, D) unit embeddings, in one call), then averaged per clip and renormalised."""
    pieces = [split_windows(w, window) for w in waves]
    owner = np.repeat(np.arange(len(waves)), [len(p) for p in pieces])  # window -> clip index
    flat = encode([w for p in pieces for w in p])  # (total windows, D)
    sums = np.zeros((len(waves), flat.shape[1]), np.float32)
    np.add.at(sums, owner, flat)
    return F.normalize(torch.from_numpy(sums), dim=-1).numpy()


@torch.no_grad()
def embed_audio_layers(model: "ClapModel", waves: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """48 kHz mono waves -> (N, L, H): a speech tower's every hidden layer pooled over the clip, before the
    projection (what layer-wise probes such as SUPERB's weighted sum train on). Long clips: mean over windows."""
    tower = model.audio_encoder
    if not hasattr(tower, "layer_features"):
        raise ValueError(f"the {model.config.audio_encoder.type} audio encoder has no per-layer features: "
                         "only speech towers (wav2vec2, whisper) do")
    if not len(waves):
        raise ValueError("embed_audio_layers needs at least one waveform")
    pieces = [split_windows(w, model.frontend.clip_samples) for w in waves]
    flat = [w for p in pieces for w in p]
    out = []
    with evaluating(model):
        for chunk in batched(flat, batch_size):
            padded, lengths = pad_batch(chunk)
            fixed, valid = model.frontend.fixed_waveforms(padded.to(model.device), lengths)
            out.append(tower.layer_features(fixed, valid).float().cpu())  # (b, L, H)
    feats = torch.cat(out).numpy()
    owner = np.repeat(np.arange(len(waves)), [len(p) for p in pieces])  # window -> clip index
    sums = np.zeros((len(waves),) + feats.shape[1:], np.float32)
    np.add.at(sums, owner, feats)
    return sums / np.bincount(owner, minlength=len(waves)).astype(np.float32)[:, None, None]


def decode_threads_for(device: torch.device) -> int:
    """Threads that decode files for embed_audio: 1 on CPU, where the model's own threads need the cores; on a
    GPU, which embeds far faster than one thread decodes, up to 4 of the process' cores (measured on an H200
    host: 1, 4 and 8 threads gave 194, 272 and 206 clips/s of 10 s WAV files: more than 4 was slower)."""
    if device.type == "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


def embed_audio(model: "ClapModel", audio: AudioInput | Iterable[AudioInput], sample_rate: int | None = None,
                batch_size: int = 16, long_audio: LongAudio = "auto", precision: Precision = "auto",
                decode_threads: int | None = None) -> np.ndarray:
    """Paths or arrays (any rate when sample_rate is given) -> (N, D) unit embeddings, decoded a batch ahead
    (decode_ahead) with `decode_threads` threads (None: decode_threads_for(model.device))."""
    threads = decode_threads if decode_threads is not None else decode_threads_for(model.device)
    return decode_ahead(audio, sample_rate, batch_size, threads,
                        lambda waves: embed_waveforms(model, waves, batch_size, long_audio, precision))


def decode_ahead(audio: AudioInput | Iterable[AudioInput], sample_rate: int | None, batch_size: int,
                 threads: int, embed: Callable[[list[np.ndarray]], np.ndarray]) -> np.ndarray:
    """Paths or arrays -> `embed` (48 kHz mono waves -> (b, D)) batch by batch -> (N, D).

    `threads` threads decode the next batch's files while `embed` runs on this one, and only those two batches'
    waveforms are in memory, however many paths are given (a file that does not decode raises here, once the
    batches before it are embedded). The one loop of ClapModel.embed_audio and OnnxTowers.embed_audio."""
    items = [audio] if _is_single_audio(audio) else list(audio)
    chunks = list(batched(items, batch_size))
    if not chunks:
        return embed([])
    if threads < 1:
        raise ValueError(f"decode_threads must be >= 1, got {threads}")
    out = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="clap-decode") as decoder:
        def submit(chunk: Sequence[AudioInput]) -> list:
            return [decoder.submit(load_waveform, item, sample_rate) for item in chunk]

        pending = submit(chunks[0])
        try:
            for i in range(len(chunks)):
                waves = [future.result() for future in pending]  # in order: the first bad file raises
                pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else []
                out.append(embed(waves))  # (b, D)
        finally:
            for future in pending:  # an error: the next batch is not decoded further
                future.cancel()
    return np.concatenate(out)


def _is_single_audio(audio) -> bool:
    if isinstance(audio, (str, bytes)) or hasattr(audio, "__fspath__"):
        return True
    return isinstance(audio, (np.ndarray, torch.Tensor)) and audio.ndim == 1


@torch.no_grad()
def embed_text(model: "ClapModel", texts: str | Sequence[str], batch_size: int = 64,
               precision: Precision = "auto") -> np.ndarray:
    """Captions -> (N, D) unit embeddings."""
    model.require_text_tower("embed_text")
    texts = [texts] if isinstance(texts, str) else list(texts)
    with evaluating(model), autocast(model, precision):
        encoder = runner(model, precision)
        out = [F.normalize(encoder.encode_text(**model.tokenize(chunk), normalize=False).float(), dim=-1).cpu()
               for chunk in batched(texts, batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.embed_dim), np.float32)


def class_embeddings(model: "ClapModel", labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(C, D) prompt-ensembled class vectors: every template filled with every label."""
    prompts = [p for label in labels for p in format_templates(templates, label)]
    emb = embed_text(model, prompts).reshape(len(labels), len(templates), -1)  # (C, T, D)
    return zero_shot_classifier(emb)


def zero_shot(model: "ClapModel", audio: AudioInput | Iterable[AudioInput], labels: Sequence[str],
              templates: Sequence[str] = DEFAULT_TEMPLATES, sample_rate: int | None = None,
              audio_embeds: np.ndarray | None = None) -> np.ndarray:
    """Per-label probabilities (N, C) for each clip, using the model's learned temperature."""
    if audio_embeds is None:
        audio_embeds = embed_audio(model, audio, sample_rate)
    scale = float(model.logit_scales()[0].detach())
    return zero_shot_predict(audio_embeds, class_embeddings(model, labels, templates), logit_scale=scale)


def similarity(model: "ClapModel", audio: AudioInput | Iterable[AudioInput], texts: str | Sequence[str],
               sample_rate: int | None = None) -> np.ndarray:
    """Cosine similarity (N_audio, N_text) between clips and captions."""
    return embed_audio(model, audio, sample_rate) @ embed_text(model, texts).T
