"""Audio decoding, resampling and compact storage.

Every clip that enters the system goes through `stream_audio` (or `decode_audio`,
which joins its blocks): it accepts a local path or the raw bytes of an object (the
caller fetches S3 objects), decodes any common container/codec in bounded blocks
(never allocating from a header's frame count), and yields float32 (C, n) audio at
48 kHz; `max_seconds` stops decoding as soon as a file passes it. Bad inputs
raise `AudioDecodeError` with a short machine-readable `reason`, so pipelines can
count rejects per reason instead of parsing messages.

soundfile (libsndfile) is tried first because it is fast and exact for
wav/flac/ogg/mp3; anything it cannot open goes to PyAV, which ships FFmpeg and
covers mp4/m4a/webm/opus and friends.

`encode_flac` / `decode_flac` store 48 kHz audio in Parquet shards, and
`clap_demo.audio_files.encode_audio_file` writes the other formats (synthetic corpora and tests).
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
from dataclasses import dataclass
from typing import Iterator

import av
import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 48_000
MAX_CLIP_SECONDS = 1800.0  # evaluate / embed: a longer clip (declared or decoded) is too_long; decoded audio is
# held for the model, so this bounds a worker's memory (~0.35 GB at 48 kHz float32)
RESAMPLE_QUALITY = "VHQ"  # soxr's best preset; resampling is a small share of preprocessing cost

# -----------------------------------------------------------------------------
# errors


class AudioDecodeError(ValueError):
    """A clip that cannot become valid audio.

    reason is one of: missing_file, empty_file, is_directory, fifo, device,
    not_regular_file, symlink_loop (paths that are not regular files are never
    opened), undecodable (no decoder recognises the bytes), truncated (the header
    ends before any audio), decode_failed (the stream was recognised but no packet
    decoded), no_samples (decoded cleanly to zero samples), no_audio_stream,
    nan_or_inf, too_many_channels, too_long (declared or decoded length past the
    caller's max_seconds: decoding stops there, so memory is bounded).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# -----------------------------------------------------------------------------
# decoding: streamed in bounded blocks, so memory never follows what a header claims or how long a file is

DECODE_BLOCK_FRAMES = 1 << 16  # source frames per decoded block (~1.4 s at 48 kHz): the decoder's working set


def check_local_file(path: str | os.PathLike) -> None:
    """Reject a path that is not a regular file, without following a symlink loop or opening a FIFO/device
    (opening a FIFO blocks forever, a device can be endless)."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks; a loop raises ELOOP
    except FileNotFoundError as e:
        raise AudioDecodeError("missing_file", f"no such file: {path}") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AudioDecodeError("symlink_loop", f"symbolic link loop: {path}") from e
        raise  # permission or I/O error: not a verdict on the data (callers decide transient vs bad)
    if stat.S_ISDIR(mode):
        raise AudioDecodeError("is_directory", f"a directory, not an audio file: {path}")
    if stat.S_ISFIFO(mode):
        raise AudioDecodeError("fifo", f"a named pipe, never opened: {path}")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise AudioDecodeError("device", f"a device file, never opened: {path}")
    if not stat.S_ISREG(mode):
        raise AudioDecodeError("not_regular_file", f"not a regular file: {path}")


def open_source(source: str | bytes | os.PathLike) -> str | io.BytesIO:
    """A checked path string (the file is read by the decoder block by block) or an in-memory file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioDecodeError("empty_file", "source has 0 bytes")
        return io.BytesIO(bytes(source))
    check_local_file(source)
    if os.path.getsize(source) == 0:
        raise AudioDecodeError("empty_file", "source has 0 bytes")
    return os.fspath(source)


@dataclass
class NativeStream:
    """An opened audio stream before any sample is decoded: what the header says, and the block iterator."""
    sample_rate: int
    channels: int
    declared_seconds: float | None  # from the header: a claim, never used to allocate
    blocks: Iterator[np.ndarray]  # (C, n) float32 at sample_rate, n <= DECODE_BLOCK_FRAMES-ish


def soundfile_stream(readable) -> NativeStream | None:
    """Open with libsndfile; None when it does not understand the bytes, or fails before the first block
    (then PyAV gets a go). A failure after the first block ends the stream: a damaged tail costs the tail."""
    f = None
    try:
        f = sf.SoundFile(readable)
        first = f.read(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)  # (n, C): allocates n, never f.frames
    except (RuntimeError, ValueError):  # LibsndfileError is a RuntimeError
        if f is not None:
            f.close()
        if not isinstance(readable, str):
            readable.seek(0)
        return None

    def blocks() -> Iterator[np.ndarray]:
        with f:
            block = first
            while len(block):
                yield np.ascontiguousarray(block.T)
                try:
                    block = f.read(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)
                except RuntimeError:
                    return  # corrupt data after a good prefix: keep the prefix, like ffmpeg does

    declared = f.frames / f.samplerate if f.frames > 0 and f.samplerate > 0 else None
    return NativeStream(int(f.samplerate), int(f.channels), declared, blocks())


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


def decoded_frames(container: av.container.InputContainer, stream: av.AudioStream) -> Iterator[av.AudioFrame]:
    """Every decodable frame of the stream, skipping corrupt packets the way the ffmpeg CLI does; raises
    decode_failed at the end when packets failed and nothing decoded."""
    decoded = failures = 0
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError:
            failures += 1  # the demuxer hit corrupt or truncated data: keep what decoded so far
            break
        try:
            for frame in stream.codec_context.decode(packet):
                if frame.samples > 0:
                    decoded += 1
                    yield frame
        except av.error.FFmpegError:
            failures += 1
    try:
        for frame in stream.codec_context.decode(None):
            if frame.samples > 0:
                decoded += 1
                yield frame
    except av.error.FFmpegError:
        failures += 1
    if not decoded and failures:
        raise AudioDecodeError("decode_failed", f"all {failures} packets of the {stream.codec_context.name} stream failed")


def pyav_stream(readable) -> NativeStream:
    """Open the first audio stream of any FFmpeg-readable container; frames are decoded lazily."""
    try:
        container = av.open(readable, mode="r")
    except av.error.EOFError as e:
        raise AudioDecodeError("truncated", f"data ends inside the header ({e})") from e
    except av.error.FFmpegError as e:
        raise AudioDecodeError("undecodable", f"no decoder recognises the data ({e})") from e
    if not container.streams.audio:
        name = container.format.name
        container.close()
        raise AudioDecodeError("no_audio_stream", f"{name} container has no audio stream")
    stream = container.streams.audio[0]
    rate, channels = int(stream.codec_context.sample_rate or 0), int(stream.codec_context.channels or 0)
    declared = container.duration / av.time_base if container.duration and container.duration > 0 else None

    def blocks() -> Iterator[np.ndarray]:
        with container:
            pending, size = [], 0
            for frame in decoded_frames(container, stream):
                chunk = frame_to_float(frame)  # (C, n)
                if frame.sample_rate != rate or chunk.shape[0] != channels:
                    raise AudioDecodeError("decode_failed", "channel count or sample rate changes inside the stream")
                pending.append(chunk)
                size += chunk.shape[1]
                if size >= DECODE_BLOCK_FRAMES:
                    yield np.concatenate(pending, axis=1)
                    pending, size = [], 0
            if pending:
                yield np.concatenate(pending, axis=1)

    if rate <= 0 or channels <= 0:
        container.close()
        raise AudioDecodeError("decode_failed", "the audio stream has no sample rate or channel layout")
    return NativeStream(rate, channels, declared, blocks())


@dataclass
class AudioStream:
    """Decoded audio as a stream of (C, n) float32 blocks at `sample_rate` (checked, downmixed, resampled)."""
    sample_rate: int
    channels: int  # of the blocks (1 when mono)
    source_rate: int
    source_channels: int
    declared_seconds: float | None
    blocks: Iterator[np.ndarray]


def stream_audio(
    source: str | bytes | os.PathLike,
    *,
    mono: bool = True,
    target_sr: int | None = TARGET_SR,
    max_channels: int | None = None,
    max_seconds: float | None = None,
) -> AudioStream:
    """Open a path or raw bytes and stream it in bounded blocks; memory is flat in the file's length.

    Raises AudioDecodeError when opening (missing/empty/non-regular file, undecodable, too_many_channels,
    too_long when the header declares more than max_seconds) and while iterating (nan_or_inf, too_long as
    soon as the decoded audio passes max_seconds: decoding stops there, decode_failed, no_samples).
    """
    readable = open_source(source)
    native = soundfile_stream(readable) or pyav_stream(readable)
    if max_channels is not None and native.channels > max_channels:
        raise AudioDecodeError("too_many_channels", f"{native.channels} channels > max_channels={max_channels}")
    if max_seconds is not None and native.declared_seconds is not None and native.declared_seconds > max_seconds:
        raise AudioDecodeError("too_long", f"header declares {native.declared_seconds:.1f} s > {max_seconds} s "
                                           "(checked before decoding)")
    out_sr = target_sr or native.sample_rate
    channels = 1 if mono else native.channels
    return AudioStream(out_sr, channels, native.sample_rate, native.channels, native.declared_seconds,
                       checked_blocks(native, mono, out_sr, max_seconds))


def checked_blocks(native: NativeStream, mono: bool, out_sr: int, max_seconds: float | None) -> Iterator[np.ndarray]:
    """Check, downmix and resample the native blocks one at a time."""
    limit = None if max_seconds is None else int(max_seconds * native.sample_rate)
    resampler = None
    if out_sr != native.sample_rate:
        resampler = soxr.ResampleStream(native.sample_rate, out_sr, 1 if mono else native.channels,
                                        dtype="float32", quality=RESAMPLE_QUALITY)
    total = 0
    for block in native.blocks:
        total += block.shape[1]
        if limit is not None and total > limit:
            raise AudioDecodeError("too_long", f"decoded audio passes {max_seconds} s (decoding stopped there)")
        # a sum in float64 cannot overflow from float32 samples and keeps any NaN or inf: one pass, no mask array
        if not math.isfinite(np.add.reduce(block, axis=None, dtype=np.float64)):
            raise AudioDecodeError("nan_or_inf", "decoded samples contain NaN or inf")
        if mono and block.shape[0] > 1:
            block = downmix(block)  # downmix first: resampling one channel is cheaper than C
        if resampler is not None:
            out = resampler.resample_chunk(np.ascontiguousarray(block.T))  # (m, C)
            block = np.ascontiguousarray(out.T, dtype=np.float32)
        if block.shape[1]:
            yield block
    if total == 0:
        raise AudioDecodeError("no_samples", "decoded to zero samples")
    if resampler is not None:
        tail = resampler.resample_chunk(np.zeros((0, 1 if mono else native.channels), np.float32), last=True)
        if len(tail):
            yield np.ascontiguousarray(tail.T, dtype=np.float32)


def decode_audio(
    source: str | bytes | os.PathLike,
    *,
    mono: bool = True,
    target_sr: int | None = TARGET_SR,
    max_channels: int | None = None,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode a path or raw bytes to float32 (C, N) audio (C=1 when mono) at target_sr.

    target_sr=None keeps the native rate. max_seconds bounds the memory (too_long past it, see
    stream_audio). Raises AudioDecodeError on bad input.
    """
    stream = stream_audio(source, mono=mono, target_sr=target_sr, max_channels=max_channels, max_seconds=max_seconds)
    blocks = list(stream.blocks)  # each (C, n); at least one sample, or no_samples was raised
    return np.concatenate(blocks, axis=1) if len(blocks) != 1 else blocks[0], stream.sample_rate


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
