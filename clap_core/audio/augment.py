"""Deterministic audio augmentation, speech + environment mixing, caption merging.

Every random choice of an augmented copy comes from a numpy Generator derived from a
stable hash of (seed, clip_id, copy_index), so any worker in any process rebuilds
exactly the same copy. audiomentations draws from the global `random` / `np.random`
state, so we never let it draw: we draw each effect's parameters ourselves, write them
into the transform's `parameters` and freeze them, which makes the transform a pure
function of its input. The drawn parameters are returned as a JSON-able record.

Chain order (each effect has its own probability):
    env mix -> reverb -> pitch shift -> clipping -> time mask -> frequency mask -> peak limit
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from audiomentations import BandStopFilter, ClippingDistortion, PitchShift, TimeMask
from audiomentations.core.utils import convert_frequency_to_mel, convert_mel_to_frequency
from scipy.signal import fftconvolve

from clap_core.audio.clips import loop_to_length
from clap_core.audio.codec import TARGET_SR, decode_audio

# -----------------------------------------------------------------------------
# config


@dataclass
class AugmentConfig:
    copies: int = 0  # augmented copies per source clip, in addition to the original
    splits: tuple[str, ...] = ("train",)  # splits that get the copies; the others (valid, test) keep the clean clip
    seed: int = 0  # global seed; a copy's randomness depends only on (seed, clip_id, copy_index)
    # reverb
    reverb_prob: float = 0.5  # probability of convolving with a room impulse response
    reverb_ir_dir: str | None = None  # folder of IR audio files; None: synthetic rooms
    reverb_rt60_range: tuple[float, float] = (0.2, 1.0)  # synthetic RT60 in seconds (60 dB decay time)
    reverb_drr_db_range: tuple[float, float] = (0.0, 12.0)  # synthetic direct-to-reverberant energy ratio, dB
    reverb_early_reflections: int = 8  # sparse taps in the first 50 ms of a synthetic IR
    # clipping distortion
    clipping_prob: float = 0.2  # probability of hard clipping
    clipping_percent_range: tuple[int, int] = (0, 20)  # percent of samples clipped (half at each extreme)
    # pitch shift
    pitch_shift_prob: float = 0.3  # probability of shifting pitch without changing tempo
    pitch_semitone_range: tuple[float, float] = (-3.0, 3.0)  # shift in semitones
    # time masking
    time_mask_prob: float = 0.3  # probability of silencing one stretch of the clip
    time_mask_fraction_range: tuple[float, float] = (0.02, 0.15)  # silenced length / clip length
    # frequency masking
    freq_mask_prob: float = 0.3  # probability of removing one band with a band-stop filter
    freq_mask_center_hz_range: tuple[float, float] = (200.0, 6000.0)  # band centre, drawn uniformly in mels
    freq_mask_bandwidth_range: tuple[float, float] = (0.1, 0.6)  # band width as a fraction of its centre
    freq_mask_rolloff_db: int = 24  # filter steepness in dB/octave (multiple of 6)
    # environmental mix (CLARA): out = lam * speech + (1 - lam) * env
    mix_prob: float = 1.0  # probability of mixing when augment_clip is given an env clip
    mix_lambda_range: tuple[float, float] = (0.01, 0.8)  # range of the speech weight lam


# -----------------------------------------------------------------------------
# stable randomness


def stable_seed(*parts: object) -> int:
    """64-bit integer from a blake2b hash of the parts; equal across processes and machines
    (unlike Python's salted hash())."""
    key = "/".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def derive_rng(seed: int, clip_id: str, copy_index: int, stream: str) -> np.random.Generator:
    """Generator for one effect of one copy. A stream per effect keeps each effect's draws
    unchanged when another effect's probability or range is edited."""
    return np.random.default_rng(stable_seed(seed, clip_id, copy_index, stream))


def uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


# -----------------------------------------------------------------------------
# reverb


def synthetic_rir(rng: np.random.Generator, rt60: float, drr_db: float, n_reflections: int, sr: int = TARGET_SR) -> np.ndarray:
    """Room impulse response (L,) with L = rt60 * sr: a unit direct path, sparse early
    reflections in the first 50 ms, and a noise tail whose amplitude falls by 60 dB over
    rt60 seconds. Reflections + tail are scaled so direct / reverberant energy = drr_db.
    """
    n = max(int(rt60 * sr), 2)
    envelope = np.exp(-np.log(1000.0) * np.arange(n) / sr / rt60)  # 1e-3 (-60 dB) at rt60
    reverberant = rng.standard_normal(n) * envelope
    taps = rng.integers(int(0.001 * sr), int(0.05 * sr), size=n_reflections)
    taps = taps[taps < n]
    # reflections are discrete wall bounces: make them stand out of the diffuse tail
    reverberant[taps] += rng.choice([-1.0, 1.0], size=taps.size) * rng.uniform(2.0, 4.0, size=taps.size) * envelope[taps]
    reverberant[0] = 0.0
    reverberant *= np.sqrt(10.0 ** (-drr_db / 10.0) / np.sum(reverberant**2))
    reverberant[0] = 1.0  # direct path
    return reverberant.astype(np.float32)


IR_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".webm"}  # files in reverb_ir_dir taken as IRs


@functools.lru_cache(maxsize=8)
def load_ir_bank(ir_dir: str) -> dict[str, np.ndarray]:
    """Every decodable audio file under ir_dir as a mono 48 kHz IR (L,), peak-normalised,
    keyed by its path relative to ir_dir (sorted, so choices are reproducible)."""
    root = Path(ir_dir)
    bank = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IR_SUFFIXES):
        ir, _ = decode_audio(path, mono=True, target_sr=TARGET_SR)  # (1, L)
        peak = np.abs(ir[0]).max()
        if peak == 0:
            raise ValueError(f"silent impulse response: {path}")
        bank[path.relative_to(root).as_posix()] = ir[0] / peak
    if not bank:
        raise ValueError(f"no impulse responses in {ir_dir}")
    return bank


def convolve_same_loudness(wave: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """Convolve (N,) with an IR, keep N samples, and restore the dry RMS so that the room
    changes the timbre but not the loudness statistics of the corpus."""
    wet = fftconvolve(wave, ir)[: wave.shape[0]]
    dry_rms, wet_rms = np.sqrt(np.mean(wave**2)), np.sqrt(np.mean(wet**2))
    return (wet * (dry_rms / wet_rms) if wet_rms > 0 else wet).astype(np.float32)


def apply_reverb(
    wave: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, ir_bank: dict[str, np.ndarray] | None
) -> tuple[np.ndarray, dict]:
    if ir_bank is None:
        rt60, drr_db = uniform(rng, cfg.reverb_rt60_range), uniform(rng, cfg.reverb_drr_db_range)
        ir = synthetic_rir(rng, rt60, drr_db, cfg.reverb_early_reflections)
        return convolve_same_loudness(wave, ir), {"ir": "synthetic", "rt60": rt60, "drr_db": drr_db}
    names = sorted(ir_bank)
    name = names[int(rng.integers(len(names)))]
    return convolve_same_loudness(wave, ir_bank[name]), {"ir": name}


# -----------------------------------------------------------------------------
# audiomentations effects with parameters drawn by us


def run_frozen(transform, wave: np.ndarray, parameters: dict) -> np.ndarray:
    """Apply an audiomentations transform with the given parameters and no global RNG use."""
    transform.parameters = {"should_apply": True, **parameters}
    transform.freeze_parameters()
    return transform(wave, sample_rate=TARGET_SR)


def apply_pitch_shift(wave: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
    semitones = uniform(rng, cfg.pitch_semitone_range)
    shifted = run_frozen(PitchShift(method="signalsmith_stretch"), wave, {"num_semitones": semitones})
    return shifted, {"semitones": semitones}


def apply_clipping(wave: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
    lo, hi = cfg.clipping_percent_range
    # audiomentations clips int(percent / 2) percent at each extreme: draw per side so the record is exact
    percent = 2 * int(rng.integers(lo // 2, hi // 2 + 1))
    return run_frozen(ClippingDistortion(), wave, {"percentile_threshold": percent}), {"percent": percent}


def apply_time_mask(wave: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
    n = wave.shape[0]
    length = int(round(uniform(rng, cfg.time_mask_fraction_range) * n))
    start = int(rng.integers(0, n - length + 1))
    masked = run_frozen(TimeMask(), wave, {"t": length, "t0": start})
    return masked, {"start_sample": start, "num_samples": length}


def apply_freq_mask(wave: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
    lo, hi = (convert_frequency_to_mel(f) for f in cfg.freq_mask_center_hz_range)
    center = float(convert_mel_to_frequency(rng.uniform(lo, hi)))  # uniform in mels: even spread to the ear
    bandwidth = center * uniform(rng, cfg.freq_mask_bandwidth_range)
    parameters = {"center_freq": center, "bandwidth": bandwidth, "rolloff": cfg.freq_mask_rolloff_db}
    band_stop = BandStopFilter(min_rolloff=cfg.freq_mask_rolloff_db, max_rolloff=cfg.freq_mask_rolloff_db)
    filtered = run_frozen(band_stop, wave, parameters)
    return filtered, {"center_hz": center, "bandwidth_hz": bandwidth, "rolloff_db": cfg.freq_mask_rolloff_db}


# -----------------------------------------------------------------------------
# environmental mix


def draw_mix_lambda(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Speech weight lam ~ U(lo, hi)."""
    return float(rng.uniform(lo, hi))


def mix_speech_env(speech: np.ndarray, env: np.ndarray, lam: float) -> np.ndarray:
    """lam * speech + (1 - lam) * env, with env (1, M) looped/cropped to speech's (1, N)."""
    return (lam * speech + (1.0 - lam) * loop_to_length(env, speech.shape[1])).astype(np.float32)


def pair_speech_with_env(ids_speech: list[str], ids_env: list[str], seed: int) -> list[tuple[str, str]]:
    """Give each speech id an env partner chosen by a stable hash of (seed, speech_id).

    Env ids are sorted first so the pairing does not depend on their input order.
    """
    env = sorted(set(ids_env))
    if not env:
        raise ValueError("no env clips to pair with")
    return [(s, env[stable_seed(seed, s, "env_partner") % len(env)]) for s in ids_speech]


# -----------------------------------------------------------------------------
# the chain


def peak_limit(wave: np.ndarray) -> tuple[np.ndarray, float]:
    """Scale down so |x| <= 1; returns the gain applied (1.0 when untouched)."""
    peak = float(np.abs(wave).max(initial=0.0))
    if peak <= 1.0:
        return wave, 1.0
    return (wave / peak).astype(np.float32), 1.0 / peak


def effect_chain(cfg: AugmentConfig, ir_bank: dict[str, np.ndarray] | None) -> list[tuple[str, float, Callable]]:
    """(name, probability, effect(wave (N,), rng) -> (wave, params)) in application order."""
    return [
        ("reverb", cfg.reverb_prob, lambda w, rng: apply_reverb(w, rng, cfg, ir_bank)),
        ("pitch_shift", cfg.pitch_shift_prob, lambda w, rng: apply_pitch_shift(w, rng, cfg)),
        ("clipping", cfg.clipping_prob, lambda w, rng: apply_clipping(w, rng, cfg)),
        ("time_mask", cfg.time_mask_prob, lambda w, rng: apply_time_mask(w, rng, cfg)),
        ("freq_mask", cfg.freq_mask_prob, lambda w, rng: apply_freq_mask(w, rng, cfg)),
    ]


def augment_clip(
    wave: np.ndarray,
    clip_id: str,
    copy_index: int,
    cfg: AugmentConfig,
    ir_bank: dict[str, np.ndarray] | None = None,
    env: np.ndarray | None = None,
    env_id: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Augmented copy of (1, N) float32 48 kHz audio and the record of applied effects.

    ir_bank (name -> IR (L,)) overrides cfg.reverb_ir_dir; with neither, reverb uses
    synthetic rooms. env (1, M) is mixed in with probability cfg.mix_prob; the caller
    merges the captions when the record holds "env_mix".
    """
    if not np.isfinite(wave).all():
        raise ValueError(f"{clip_id}: augment_clip needs finite samples")
    if ir_bank is None and cfg.reverb_ir_dir is not None:
        ir_bank = load_ir_bank(cfg.reverb_ir_dir)
    applied = {}
    out = np.asarray(wave, dtype=np.float32)  # (1, N)
    mix_rng = derive_rng(cfg.seed, clip_id, copy_index, "env_mix")
    if env is not None and mix_rng.random() < cfg.mix_prob:
        lam = draw_mix_lambda(mix_rng, *cfg.mix_lambda_range)
        out = mix_speech_env(out, env, lam)
        applied["env_mix"] = {"lambda": lam, "env_id": env_id}
    mono = out[0]  # (N,): audiomentations treats 1-D input as mono
    for name, prob, effect in effect_chain(cfg, ir_bank):
        rng = derive_rng(cfg.seed, clip_id, copy_index, name)
        if rng.random() < prob:
            mono, applied[name] = effect(mono, rng)
    out, gain = peak_limit(np.array(mono, dtype=np.float32)[None, :])  # a copy: never alias the input
    if gain != 1.0:
        applied["peak_limit"] = {"gain": gain}
    return out, applied
