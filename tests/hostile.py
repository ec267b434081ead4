"""Hostile inputs generated on the fly (no downloads): lying headers, long files written block by block,
float audio past full scale, non-regular files, and manifests that trip naive readers.

`write_hostile_corpus(root)` lays them out as one JSONL manifest (plus a sidecar folder and a
WebDataset tar) and returns the manifest path and the number of input rows every job must account for.
"""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf

from clap_core.audio.codec import encode_flac
from clap_demo.audio_files import encode_audio_file


def tone(seconds: float, sr: int = 16000, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def lying_flac(declared_frames: int = (1 << 36) - 1) -> bytes:
    """A ~1 s FLAC whose STREAMINFO declares `declared_frames` (2^36 - 1: ~16 days at 48 kHz, 256 GiB
    as float32). The 36-bit total-samples field is the low bits of the big-endian word at bytes 18..26."""
    data = bytearray(encode_flac(tone(1.0, 48000)[None], 48000, "PCM_16"))
    (word,) = struct.unpack(">Q", bytes(data[18:26]))
    data[18:26] = struct.pack(">Q", (word & ~((1 << 36) - 1)) | declared_frames)
    return bytes(data)


def write_long_flac(path: Path, seconds: float, sr: int = 48000, tone_seconds: float = 20.0) -> Path:
    """A long mono FLAC, a tone then digital silence, written block by block (the test never holds it)."""
    block = sr * 10
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, format="FLAC", subtype="PCM_16") as f:
        written = 0
        while written < seconds * sr:
            n = int(min(block, seconds * sr - written))
            t = (written + np.arange(n)) / sr
            chunk = np.where(t < tone_seconds, 0.5 * np.sin(2 * np.pi * 440.0 * t), 0.0).astype(np.float32)
            f.write(chunk)
            written += n
    return path


def float_wav(peak: float, seconds: float = 1.0, sr: int = 16000) -> bytes:
    """A 32-bit float WAV peaking at `peak` (> 1.0 is legal in float WAV, FLAC storage would clip it)."""
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, sr, amp=peak), sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def deep_json(depth: int = 100_000) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_hostile_corpus(root: Path) -> tuple[Path, int]:
    """A JSONL manifest of hostile rows next to its audio; returns (manifest, input rows).

    Every row must end as output or as a reject with a reason; good rows are there so a job that
    drops everything cannot pass."""
    root.mkdir(parents=True, exist_ok=True)
    audio = root / "audio"
    audio.mkdir(exist_ok=True)
    good = encode_audio_file(tone(1.0), 16000, "wav")
    files = {
        "good.wav": good,
        "good2.flac": encode_audio_file(tone(1.5, freq=660.0), 16000, "flac"),
        "lying.flac": lying_flac(),
        "loud.wav": float_wav(2.0),
        "empty.wav": b"",
        "garbage.mp3": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "nan.wav": _nan_wav(),
    }
    for name, data in files.items():
        (audio / name).write_bytes(data)
    (audio / "a_folder.wav").mkdir(exist_ok=True)
    fifo = audio / "pipe.wav"
    if not fifo.exists():
        os.mkfifo(fifo)
    loop = audio / "loop.wav"
    if not loop.is_symlink():
        os.symlink(loop.name, loop)  # points at itself: ELOOP
    rows = [
        {"audio_path": "audio/good.wav", "caption": "a tone with a line\u2028separator and \u0085 next line"},
        {"audio_path": "audio/good2.flac", "caption": "a higher tone", "id": "clip#seg1"},
        {"audio_path": "audio/good.wav", "caption": "same id again", "id": "clip#seg1"},
        {"audio_path": "audio/lying.flac", "caption": "a header that lies"},
        {"audio_path": "audio/loud.wav", "caption": "float audio at twice full scale"},
        {"audio_path": "audio/empty.wav", "caption": "nothing"},
        {"audio_path": "audio/garbage.mp3", "caption": "random bytes"},
        {"audio_path": "audio/nan.wav", "caption": "not a number"},
        {"audio_path": "audio/a_folder.wav", "caption": "a directory"},
        {"audio_path": "audio/pipe.wav", "caption": "a named pipe"},
        {"audio_path": "audio/loop.wav", "caption": "a symlink loop"},
        {"audio_path": "audio/missing.wav", "caption": "not there"},
        {"audio_path": "audio/good.wav", "caption": "x", "id": "with#aug1"},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + [deep_json(), "[1, 2]", "{not json"]
    manifest = root / "manifest.jsonl"
    manifest.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return manifest, len(lines)


def _nan_wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.array([0.1, np.nan, 0.2] * 1000, np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()
