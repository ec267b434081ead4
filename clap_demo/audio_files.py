"""Encoders of test and demo audio in every container format the decoder reads (not used by the library)."""
from __future__ import annotations

import io

import av
import numpy as np
import soundfile as sf

from clap_core.audio.codec import as_channels_first, encode_flac

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
FILE_FORMATS = {
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


def encode_audio_file(wave: np.ndarray, sr: int, fmt: str) -> bytes:
    """Encode (C, N) or (N,) float audio in one of FILE_FORMATS' formats."""
    return FILE_FORMATS[fmt](as_channels_first(wave).astype(np.float32), sr)
