"""Small generated audio-caption corpora for tests, the demo and benchmarks.

Each clip is built from a few audible factors and its caption names exactly those
factors, so even a tiny CLAP model can learn the pairing:
    kind    "env": a pure tone; "speech": a voiced, formant-shaped harmonic sound
    pitch   low / high (tones 220 / 1760 Hz, voices 110 / 220 Hz fundamental)
    pattern steady / pulsed (4 Hz on-off, like syllables)
    noise   none / white / brown background
    glide   none / rising / falling half-octave sweep (tones only)

`write_corpus` writes such clips in mixed formats, rates and channel counts plus a
manifest.jsonl; `write_bad_inputs` writes the zoo of broken inputs that preprocessing
must reject, with the expected reject reason per row.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

from clap_core.audio.codec import TARGET_SR, encode_flac
from clap_demo.audio_files import encode_audio_file

TONE_HZ = {"low": 220.0, "high": 1760.0}
VOICE_F0_HZ = {"low": 110.0, "high": 220.0}
PULSE_HZ = 4.0  # on-off rate of "pulsed" clips, close to the syllable rate of speech
GLIDE_OCTAVES = {"none": 0.0, "rising": 0.5, "falling": -0.5}  # sweep over the whole clip
NOISE_SNR_DB = 6.0  # signal-to-noise ratio of the background noise: clearly audible, tone still dominant
PEAK = 0.5  # output peak; headroom keeps lossy encoders from clipping
# (F1, F2, F3) in Hz of three vowels, roughly /a/, /i/, /u/
VOWEL_FORMANTS = ((730.0, 1090.0, 2440.0), (270.0, 2290.0, 3010.0), (300.0, 870.0, 2240.0))
FORMANT_BANDWIDTHS = (90.0, 110.0, 170.0)

# -----------------------------------------------------------------------------
# one clip


@dataclass(frozen=True)
class ClipSpec:
    kind: str = "env"  # "env" (tone) or "speech" (voiced harmonics through vowel formants)
    pitch: str = "high"  # "low" or "high"
    pattern: str = "steady"  # "steady" or "pulsed"
    noise: str = "none"  # background: "none", "white" or "brown"
    glide: str = "none"  # tones only: "none", "rising" or "falling"
    seed: int = 0  # drives noise, phases and vowel choice

    @property
    def caption(self) -> str:
        noise = "" if self.noise == "none" else f" with {self.noise} noise"
        if self.kind == "speech":
            voicing = "speaking in short syllables" if self.pattern == "pulsed" else "holding a long vowel"
            return f"a {self.pitch} voice {voicing}{noise}"
        glide = "" if self.glide == "none" else f" {self.glide} in pitch"
        return f"a {self.pitch} pitched {self.pattern} tone{glide}{noise}"

    @property
    def label(self) -> str:
        """Short class name for zero-shot classification."""
        return f"{self.pitch} {self.pattern} {'voice' if self.kind == 'speech' else 'tone'}"


def phase_of(freq_hz: np.ndarray, sr: int) -> np.ndarray:
    """Instantaneous phase (radians) of a time-varying frequency track."""
    return 2 * np.pi * np.cumsum(freq_hz) / sr


def tone(spec: ClipSpec, t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Sine at the pitch's frequency, swept exponentially by the glide."""
    freq = TONE_HZ[spec.pitch] * 2.0 ** (GLIDE_OCTAVES[spec.glide] * t / t[-1])
    return np.sin(phase_of(freq, sr) + rng.uniform(0, 2 * np.pi))


def formant_gain(freq: np.ndarray, formants: tuple[float, ...]) -> np.ndarray:
    """Spectral envelope: sum of resonance peaks at the formants (F1 strongest)."""
    gain = np.zeros_like(freq)
    for i, (centre, width) in enumerate(zip(formants, FORMANT_BANDWIDTHS)):
        gain += 0.5**i / (1.0 + ((freq - centre) / (width / 2)) ** 2)
    return gain


def voice(spec: ClipSpec, t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Harmonics of a slightly vibrating f0 shaped by vowel formants; a new vowel per
    syllable when pulsed (switching where the gate is silent), one held vowel when steady."""
    f0 = VOICE_F0_HZ[spec.pitch]
    phase = phase_of(f0 * (1.0 + 0.01 * np.sin(2 * np.pi * 5.0 * t)), sr)  # 5 Hz, 1% vibrato
    pulsed = spec.pattern == "pulsed"
    n_syllables = int(t[-1] * PULSE_HZ) + 1 if pulsed else 1
    syllable = (t * PULSE_HZ).astype(int) if pulsed else np.zeros(len(t), int)  # (N,)
    vowels = rng.integers(len(VOWEL_FORMANTS), size=n_syllables)
    harmonics = np.arange(1, int(4000.0 // f0) + 1)  # up to 4 kHz, like band-limited speech
    gains = np.stack([formant_gain(harmonics * f0, VOWEL_FORMANTS[v]) for v in vowels])  # (S, K)
    out = np.zeros_like(t)
    for k in harmonics:
        out += gains[syllable, k - 1] * np.sin(k * phase)
    return out


def gate(spec: ClipSpec, t: np.ndarray) -> np.ndarray:
    """Amplitude envelope: raised-cosine on-off at PULSE_HZ, or steady with 10 ms fades."""
    if spec.pattern == "pulsed":
        return 0.5 - 0.5 * np.cos(2 * np.pi * PULSE_HZ * t)
    return np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)


def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def brown_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Leaky-integrated white noise (-6 dB/octave); the leak puts the corner near 40 Hz
    so the walk does not drift into DC."""
    brown = lfilter([1.0], [1.0, -0.995], rng.standard_normal(n))
    return brown - brown.mean()


SOURCES = {"env": tone, "speech": voice}  # ClipSpec.kind -> source generator
NOISES = {"white": white_noise, "brown": brown_noise}  # ClipSpec.noise -> noise generator


def make_clip(spec: ClipSpec, sr: int = TARGET_SR, seconds: float = 1.0) -> np.ndarray:
    """Render a spec to float32 (N,) with peak PEAK; same spec -> same samples."""
    rng = np.random.default_rng(spec.seed)
    t = np.arange(int(round(sr * seconds))) / sr
    signal = SOURCES[spec.kind](spec, t, sr, rng) * gate(spec, t)
    if spec.noise != "none":
        noise = NOISES[spec.noise](len(t), rng)
        gain = np.sqrt(np.mean(signal**2) / np.mean(noise**2)) * 10 ** (-NOISE_SNR_DB / 20)
        signal = signal + gain * noise
    return (PEAK * signal / np.abs(signal).max()).astype(np.float32)


def random_spec(rng: np.random.Generator, seed: int) -> ClipSpec:
    """Draw factors: 30% speech; tones glide half the time."""
    kind = "speech" if rng.random() < 0.3 else "env"
    glide = "none" if kind == "speech" or rng.random() < 0.5 else str(rng.choice(["rising", "falling"]))
    return ClipSpec(
        kind=kind,
        pitch=str(rng.choice(["low", "high"])),
        pattern=str(rng.choice(["steady", "pulsed"])),
        noise=str(rng.choice(["none", "white", "brown"])),
        glide=glide,
        seed=seed,
    )


# -----------------------------------------------------------------------------
# corpus on disk

# File extension per encoder format name (the rest use their own name).
EXTENSIONS = {"webm_vorbis": "webm"}
# Channel limit per encoder: clips in these formats get at most this many channels.
MAX_ENCODER_CHANNELS = {"mp3": 2, "webm_vorbis": 2}


def split_of(clip_id: str) -> str:
    """80/10/10 train/valid/test from a CRC of the id: stable when corpora are merged or reordered."""
    bucket = zlib.crc32(clip_id.encode("utf-8")) % 10
    return "train" if bucket < 8 else ("valid" if bucket == 8 else "test")


def spatialise(mono: np.ndarray, channels: int) -> np.ndarray:
    """(N,) -> (C, N): channel c is delayed by c samples and attenuated, like spaced microphones."""
    return np.stack([np.roll(mono, c) * 0.9**c for c in range(channels)]).astype(np.float32)


def write_audio_file(path: Path, wave: np.ndarray, sr: int, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_audio_file(wave, sr, fmt))


def write_corpus(
    out_dir: str | Path,
    n_clips: int,
    seed: int,
    formats: tuple[str, ...] = ("wav", "flac", "ogg", "mp3", "m4a"),
    sample_rates: tuple[int, ...] = (16000, 22050, 44100, 48000),
    channels: tuple[int, ...] = (1, 2),
    seconds: tuple[float, float] = (1.0, 3.0),
) -> Path:
    """Write n_clips generated clips under out_dir/audio and return out_dir/manifest.jsonl.

    Formats cycle so every one appears; rate, channels, length (ms resolution) and the
    clip's factors are drawn from a generator seeded by (seed, clip index).
    """
    out_dir = Path(out_dir)
    rows = []
    for i in range(n_clips):
        rng = np.random.default_rng([seed, i])
        spec = random_spec(rng, seed=int(rng.integers(2**31)))
        fmt = formats[i % len(formats)]
        sr = int(rng.choice(sample_rates))
        n_channels = min(int(rng.choice(channels)), MAX_ENCODER_CHANNELS.get(fmt, 8))
        length = round(float(rng.uniform(*seconds)), 3)
        clip_id = f"synth-{seed}-{i:06d}"
        audio_path = f"audio/{clip_id}.{EXTENSIONS.get(fmt, fmt)}"
        write_audio_file(out_dir / audio_path, spatialise(make_clip(spec, sr, length), n_channels), sr, fmt)
        rows.append(
            {"id": clip_id, "audio_path": audio_path, "caption": spec.caption, "label": spec.label,
             "split": split_of(clip_id), "kind": spec.kind, "language": "en"}
        )
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def write_scale_manifest(out_dir: str | Path, n_rows: int, n_real: int = 4, seed: int = 0,
                         missing_every: int = 1, duplicate_every: int = 0) -> Path:
    """A large manifest that is quick to process: n_real short real clips (speech and env), then rows
    whose audio files do not exist (rejected missing_file), every duplicate_every-th row repeating an
    earlier id (rejected duplicate_id). Writes out_dir/manifest.jsonl; returns its path."""
    out_dir = Path(out_dir)
    real = write_corpus(out_dir / "real", n_real, seed=seed, formats=("wav",), sample_rates=(16000,),
                        channels=(1,), seconds=(0.6, 0.8))
    lines = [json.loads(line) for line in real.read_text().splitlines()]
    for r in lines:
        r["audio_path"] = f"real/{r['audio_path']}"
    with open(out_dir / "manifest.jsonl", "w", encoding="utf-8") as f:
        for r in lines:
            f.write(json.dumps(r) + "\n")
        for i in range(n_rows - len(lines)):
            clip_id = f"missing-{i:08d}" if not (duplicate_every and i and i % duplicate_every == 0) else \
                f"missing-{i - 1:08d}"
            f.write(json.dumps({"id": clip_id, "audio_path": f"missing/{i:08d}.wav", "caption": f"clip {i}",
                                "split": split_of(f"missing-{i:08d}"), "kind": "env"}) + "\n")
    return out_dir / "manifest.jsonl"


# -----------------------------------------------------------------------------
# rejects zoo

NON_UTF8_CAPTION = b"caf\xe9 noise \xff\xfe"  # latin-1 'e acute' and bytes never valid in UTF-8


def flac_metadata_length(data: bytes) -> int:
    """Bytes taken by 'fLaC' and the metadata blocks, i.e. where the first audio frame starts."""
    pos = 4
    while True:
        is_last, length = data[pos] & 0x80, int.from_bytes(data[pos + 1 : pos + 4], "big")
        pos += 4 + length
        if is_last:
            return pos


def encode_float_wav(wave: np.ndarray, sr: int) -> bytes:
    """(C, N) as a float32 WAV, which can hold NaN (integer PCM cannot)."""
    buf = io.BytesIO()
    sf.write(buf, wave.T, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def write_bad_inputs(out_dir: str | Path, min_seconds: float = 0.5, max_seconds: float = 30.0) -> list[dict]:
    """Write broken and borderline inputs plus out_dir/manifest.csv (id,audio_path,caption).

    Returns one row per manifest line: id, audio_path, caption (bytes for the non-UTF-8
    row, str otherwise) and expected_reason (None where the row must be accepted). Audio
    reasons are AudioDecodeError reasons (too_many_channels assumes max_channels < 8);
    the others are silent, too_short, too_long, empty_caption, caption_not_utf8 and
    duplicate_id (the second row with an id is the duplicate).
    """
    out_dir = Path(out_dir)
    audio = out_dir / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    good_spec, short_spec, long_spec, eight_khz_spec = (
        ClipSpec(pitch="low", pattern="pulsed", seed=1), ClipSpec(seed=2), ClipSpec(pitch="low", seed=3), ClipSpec(seed=4)
    )
    good = make_clip(good_spec, 16000, 1.0)[None, :]  # (1, N)
    flac = encode_flac(good, 16000)
    with_nan = good.copy()
    with_nan[0, ::100] = np.nan

    files = {
        "empty.flac": b"",
        "random.wav": np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes(),
        "truncated.flac": flac[: flac_metadata_length(flac) + 16],  # header intact, no complete frame
        "nan.wav": encode_float_wav(with_nan, 16000),
        "silence.wav": encode_audio_file(np.zeros(16000, np.float32), 16000, "wav"),
        "short.wav": encode_audio_file(make_clip(short_spec, 16000, min_seconds / 4), 16000, "wav"),
        "long.flac": encode_flac(make_clip(long_spec, 8000, max_seconds + 1.0), 8000),
        "eight_channels.wav": encode_audio_file(spatialise(good[0], 8), 16000, "wav"),
        "good_8k.wav": encode_audio_file(make_clip(eight_khz_spec, 8000, 1.0), 8000, "wav"),
        "good.flac": flac,
    }
    for name, data in files.items():
        (audio / name).write_bytes(data)

    caption = good_spec.caption
    rows = [
        ("bad-missing", "audio/missing.wav", caption, "missing_file"),
        ("bad-empty", "audio/empty.flac", caption, "empty_file"),
        ("bad-random", "audio/random.wav", caption, "undecodable"),
        ("bad-truncated", "audio/truncated.flac", caption, "decode_failed"),
        ("bad-nan", "audio/nan.wav", caption, "nan_or_inf"),
        ("bad-silence", "audio/silence.wav", "silence", "silent"),
        ("bad-short", "audio/short.wav", short_spec.caption, "too_short"),
        ("bad-long", "audio/long.flac", long_spec.caption, "too_long"),
        ("bad-channels", "audio/eight_channels.wav", caption, "too_many_channels"),
        ("ok-8k", "audio/good_8k.wav", eight_khz_spec.caption, None),
        ("bad-empty-caption", "audio/good.flac", "", "empty_caption"),
        ("bad-caption-bytes", "audio/good.flac", NON_UTF8_CAPTION, "caption_not_utf8"),
        ("dup", "audio/good.flac", caption, None),
        ("dup", "audio/good.flac", caption, "duplicate_id"),
    ]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", "audio_path", "caption"])
    for clip_id, path, cap, _ in rows:
        # surrogateescape carries the raw non-UTF-8 bytes through the text csv writer
        writer.writerow([clip_id, path, cap.decode("utf-8", "surrogateescape") if isinstance(cap, bytes) else cap])
    (out_dir / "manifest.csv").write_bytes(text.getvalue().encode("utf-8", "surrogateescape"))
    return [{"id": i, "audio_path": p, "caption": c, "expected_reason": r} for i, p, c, r in rows]
