"""Audio decoding, resampling and compact storage.

Every clip that enters the system goes through `decode_audio`: it accepts a local
path or the raw bytes of an object (the caller fetches S3 objects), decodes any
common container/codec, and returns float32 (C, N) audio at 48 kHz. Bad inputs
raise `AudioDecodeError` with a short machine-readable `reason`, so pipelines can
count rejects per reason instead of parsing messages.

soundfile (libsndfile) is tried first because it is fast and exact for
wav/flac/ogg/mp3; anything it cannot open goes to PyAV, which ships FFmpeg and
covers mp4/m4a/webm/opus and friends.

`encode_flac` / `decode_flac` store 48 kHz audio in Parquet shards, and
`encode_audio` writes the other formats (used by the synthetic corpora and tests).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 48_000
RESAMPLE_QUALITY = "VHQ"  # soxr's best preset; resampling is a small share of preprocessing cost

# -----------------------------------------------------------------------------
# errors


class AudioDecodeError(ValueError):
    """A clip that cannot become valid audio.

    reason is one of: missing_file, empty_file, undecodable (no decoder recognises
    the bytes), truncated (the header ends before any audio), decode_failed (the
    stream was recognised but no packet decoded), no_samples (decoded cleanly to
    zero samples), no_audio_stream, nan_or_inf, too_many_channels.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# -----------------------------------------------------------------------------
# decoding


def read_source_bytes(source: str | bytes | os.PathLike) -> bytes:
    """Return the bytes of a path or pass raw bytes through; rejects missing/empty inputs."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioDecodeError("missing_file", f"no such file: {path}")
        data = path.read_bytes()
    if len(data) == 0:
        raise AudioDecodeError("empty_file", "source has 0 bytes")
    return data


def decode_with_soundfile(data: bytes) -> tuple[np.ndarray, int] | None:
    """Decode with libsndfile; None when libsndfile does not understand the bytes."""
    try:
        frames, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (N, C)
    except RuntimeError:  # soundfile.LibsndfileError: format unknown to libsndfile, or malformed
        return None
    return np.ascontiguousarray(frames.T), int(sr)


# Scale that maps each integer sample format onto [-1, 1).
_INT_SCALE = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31, np.dtype(np.int64): 2.0**63}


def frame_to_float(frame: av.AudioFrame) -> np.ndarray:
    """Convert any PyAV audio frame (planar or packed, int or float) to float32 (C, n)."""
    channels = frame.layout.nb_channels
    samples = frame.to_ndarray()
    if not frame.format.is_planar:
        samples = samples.reshape(-1, channels).T  # packed frames are interleaved (1, n*C)
    if samples.dtype == np.uint8:
        return ((samples.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if samples.dtype in _INT_SCALE:
        return (samples / _INT_SCALE[samples.dtype]).astype(np.float32)
    return samples.astype(np.float32)


def decode_packets(container: av.container.InputContainer, stream: av.AudioStream) -> tuple[list[av.AudioFrame], int]:
    """Decode every packet of the stream, skipping corrupt ones the way the ffmpeg CLI does.

    A truncated tail or one damaged packet should not cost a whole long recording;
    a stream where nothing decodes is rejected by the caller. Returns the decoded
    frames and the number of packets that failed.
    """
    frames, failures = [], 0
    try:
        for packet in container.demux(stream):
            try:
                frames.extend(stream.codec_context.decode(packet))
            except av.error.FFmpegError:
                failures += 1
    except av.error.FFmpegError:
        failures += 1  # the demuxer hit corrupt or truncated data: keep what decoded so far
    try:
        frames.extend(stream.codec_context.decode(None))
    except av.error.FFmpegError:
        failures += 1
    return [f for f in frames if f.samples > 0], failures


def decode_with_pyav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of any FFmpeg-readable container."""
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.EOFError as e:
        raise AudioDecodeError("truncated", f"data ends inside the header ({e})") from e
    except av.error.FFmpegError as e:
        raise AudioDecodeError("undecodable", f"no decoder recognises the data ({e})") from e
    with container:
        if not container.streams.audio:
            raise AudioDecodeError("no_audio_stream", f"{container.format.name} container has no audio stream")
        stream = container.streams.audio[0]
        frames, failures = decode_packets(container, stream)
        codec_name = stream.codec_context.name
    if not frames:
        if failures:
            raise AudioDecodeError("decode_failed", f"all {failures} packets of the {codec_name} stream failed")
        raise AudioDecodeError("no_samples", "the audio stream holds no samples")
    chunks = [frame_to_float(f) for f in frames]  # each (C, n)
    if len({c.shape[0] for c in chunks}) > 1 or len({f.sample_rate for f in frames}) > 1:
        raise AudioDecodeError("decode_failed", "channel count or sample rate changes inside the stream")
    return np.concatenate(chunks, axis=1), int(frames[0].sample_rate)  # (C, N)


def check_samples(wave: np.ndarray, max_channels: int | None) -> None:
    """Reject decoded audio that no later stage can use."""
    if wave.shape[1] == 0:
        raise AudioDecodeError("no_samples", "decoded to zero samples")
    if max_channels is not None and wave.shape[0] > max_channels:
        raise AudioDecodeError("too_many_channels", f"{wave.shape[0]} channels > max_channels={max_channels}")
    if not np.isfinite(wave).all():
        raise AudioDecodeError("nan_or_inf", "decoded samples contain NaN or inf")


def decode_audio(
    source: str | bytes | os.PathLike,
    *,
    mono: bool = True,
    target_sr: int | None = TARGET_SR,
    max_channels: int | None = None,
) -> tuple[np.ndarray, int]:
    """Decode a path or raw bytes to float32 (C, N) audio (C=1 when mono) at target_sr.

    target_sr=None keeps the native rate. Raises AudioDecodeError on bad input.
    """
    data = read_source_bytes(source)
    decoded = decode_with_soundfile(data)
    wave, sr = decoded if decoded is not None else decode_with_pyav(data)  # (C, N)
    check_samples(wave, max_channels)
    if mono:
        wave = downmix(wave)  # downmix first: resampling one channel is cheaper than C
    if target_sr is not None:
        wave = resample(wave, sr, target_sr)
        sr = target_sr
    return wave, sr


def as_readable(source: str | bytes | os.PathLike) -> str | io.BytesIO:
    """A path string or an in-memory file: both soundfile and PyAV open either."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    return os.fspath(source)


def probe_duration(source: str | bytes | os.PathLike) -> float | None:
    """Duration in seconds read from the header, without decoding; None if unknown."""
    try:
        return float(sf.info(as_readable(source)).duration)
    except RuntimeError:
        pass
    try:
        with av.open(as_readable(source), mode="r") as container:
            return None if container.duration is None else container.duration / av.time_base
    except (av.error.FFmpegError, OSError):
        return None


# -----------------------------------------------------------------------------
# signal helpers


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling of (C, N) audio with soxr; float32 (C, M) out."""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == target_sr:
        return wave
    out = soxr.resample(np.ascontiguousarray(wave.T), orig_sr, target_sr, quality=RESAMPLE_QUALITY)  # (M, C)
    return np.ascontiguousarray(out.T, dtype=np.float32)


def downmix(wave: np.ndarray) -> np.ndarray:
    """Average the channels of (C, N) audio into (1, N)."""
    return wave.mean(axis=0, keepdims=True, dtype=np.float32)


def as_channels_first(wave: np.ndarray) -> np.ndarray:
    """Accept (N,) or (C, N) audio and return (C, N)."""
    wave = np.asarray(wave)
    return wave[None, :] if wave.ndim == 1 else wave


# -----------------------------------------------------------------------------
# FLAC storage for shards

FLAC_BITS = {"PCM_16": 16, "PCM_24": 24}


def quantize(wave: np.ndarray, bits: int) -> np.ndarray:
    """Round (C, N) floats onto the signed `bits` grid, returned left-aligned in int32.

    Doing the rounding ourselves (instead of libsndfile's float path) makes values
    already on the grid round-trip bit-exactly and keeps encoding deterministic.
    """
    full_scale = 2.0 ** (bits - 1)
    q = np.clip(np.round(wave.astype(np.float64) * full_scale), -full_scale, full_scale - 1)
    return (q.astype(np.int32) << (32 - bits)).astype(np.int32)


def encode_flac(wave: np.ndarray, sr: int, subtype: str = "PCM_24") -> bytes:
    """Losslessly compress (C, N) or (N,) float audio to FLAC bytes (PCM_16 or PCM_24)."""
    pcm = quantize(as_channels_first(wave), FLAC_BITS[subtype])  # (C, N) int32
    buf = io.BytesIO()
    sf.write(buf, pcm.T, sr, format="FLAC", subtype=subtype)
    return buf.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """Inverse of encode_flac: FLAC bytes to float32 (C, N) and the sample rate."""
    pcm, sr = sf.read(io.BytesIO(data), dtype="int32", always_2d=True)  # (N, C), left-aligned
    return np.ascontiguousarray((pcm.T / 2.0**31).astype(np.float32)), int(sr)


# -----------------------------------------------------------------------------
# encoders for the other formats (synthetic corpora, tests)

# FFmpeg channel layout per channel count (encoders need a named layout).
CHANNEL_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def encode_with_soundfile(wave: np.ndarray, sr: int, container: str, subtype: str) -> bytes:
    """Write (C, N) audio with libsndfile."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0).T, sr, format=container, subtype=subtype)
    return buf.getvalue()


def encode_with_pyav(wave: np.ndarray, sr: int, container: str, codec: str, codec_rate: int | None = None) -> bytes:
    """Write (C, N) audio with an FFmpeg encoder; codec_rate forces the codec's sample rate.

    PyAV resamples the frames when codec_rate differs from sr (opus only runs at 48 kHz).
    """
    layout = CHANNEL_LAYOUTS[wave.shape[0]]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=codec_rate or sr, layout=layout)
        stream.codec_context.options = {"strict": "experimental"}  # FFmpeg's native vorbis encoder is "experimental"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave, dtype=np.float32), format="fltp", layout=layout)
        frame.sample_rate = sr
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


# Format name -> encoder of (C, N) float audio at sr. mp3 and webm_vorbis take at most
# 2 channels (libmp3lame, FFmpeg's native vorbis); opus is always coded at 48 kHz.
AUDIO_ENCODERS = {
    "wav": lambda w, sr: encode_with_soundfile(w, sr, "WAV", "PCM_16"),
    "flac": lambda w, sr: encode_flac(w, sr, "PCM_24"),
    "ogg": lambda w, sr: encode_with_soundfile(w, sr, "OGG", "VORBIS"),
    "mp3": lambda w, sr: encode_with_pyav(w, sr, "mp3", "libmp3lame"),
    "m4a": lambda w, sr: encode_with_pyav(w, sr, "ipod", "aac"),
    "mp4": lambda w, sr: encode_with_pyav(w, sr, "mp4", "aac"),
    "opus": lambda w, sr: encode_with_pyav(w, sr, "ogg", "libopus", codec_rate=48_000),
    "webm": lambda w, sr: encode_with_pyav(w, sr, "webm", "libopus", codec_rate=48_000),
    "webm_vorbis": lambda w, sr: encode_with_pyav(w, sr, "webm", "vorbis"),
}


def encode_audio(wave: np.ndarray, sr: int, fmt: str) -> bytes:
    """Encode (C, N) or (N,) float audio in one of AUDIO_ENCODERS' formats."""
    return AUDIO_ENCODERS[fmt](as_channels_first(wave).astype(np.float32), sr)
