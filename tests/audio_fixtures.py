"""Decoded audio for accuracy tests: synthetic voices and tones (with noise) through a lossy codec and back.

Clips are rendered at 44.1 kHz, encoded to MP3 and Ogg Vorbis, decoded and resampled to 48 kHz by the
same code paths as real files, so they carry codec artefacts, resampling and real-world levels.
"""
from __future__ import annotations

import numpy as np

from clap_core.audio.codec import decode_audio
from clap_demo.audio_files import encode_audio_file
from clap_demo.synth import ClipSpec, make_clip

SPECS = [ClipSpec(kind="speech", pitch="low", pattern="pulsed", noise="brown", seed=1),
         ClipSpec(kind="env", pitch="high", pattern="steady", noise="white", glide="rising", seed=2),
         ClipSpec(kind="speech", pitch="high", pattern="steady", noise="none", seed=3),
         ClipSpec(kind="env", pitch="low", pattern="pulsed", noise="brown", glide="falling", seed=4)]


def decoded_clips(seconds: list[float], formats: tuple[str, ...] = ("mp3", "ogg")) -> list[np.ndarray]:
    """One (N,) float32 clip at 48 kHz per requested length, cycling through SPECS and formats."""
    clips = []
    for i, length in enumerate(seconds):
        wave = make_clip(SPECS[i % len(SPECS)], sr=44_100, seconds=length)
        data = encode_audio_file(wave, 44_100, formats[i % len(formats)])
        clips.append(decode_audio(data, mono=True, target_sr=48_000)[0][0])
    return clips
