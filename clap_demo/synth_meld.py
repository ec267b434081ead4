"""A small MELD-layout corpus of real mp4 files (AAC audio + a small MPEG-4 video track): tests and the demo.

Each emotion is audible (its own pitch, pulse rate and loudness) and readable (cue words in the utterance),
so a probe on embeddings of even a randomly initialised CLAP can learn it. The CSVs are written like the real
ones: cp1252 with a right single quote b"\\x92", plus one UTF-8 line and one byte invalid in cp1252 (0x81).
"""
from __future__ import annotations

import csv
import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from clap_core.data.meld import EMOTIONS, RAW_CLIP_DIRS

SR = 16_000
SOUND = {  # emotion -> (pitch Hz, pulses per second, amplitude)
    "anger": (220.0, 8.0, 0.8), "disgust": (330.0, 1.5, 0.5), "fear": (1700.0, 10.0, 0.3),
    "joy": (880.0, 4.0, 0.7), "neutral": (500.0, 0.0, 0.4), "sadness": (150.0, 0.7, 0.2),
    "surprise": (3000.0, 3.0, 0.9)}
CUES = {
    "anger": "I am so angry, this is furious rage", "disgust": "ew that is gross and disgusting, yuck",
    "fear": "I am scared, this is terrifying and frightening", "joy": "yay I am so happy, this is wonderful",
    "neutral": "okay, the meeting is at noon on tuesday", "sadness": "I feel sad and miserable, I want to cry",
    "surprise": "whoa, really? wow, what a shock"}
SPEAKERS = ("Ross", "Rachel", "Monica", "Chandler", "Joey", "Phoebe")
HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
          "Episode", "StartTime", "EndTime"]


def emotion_wave(emotion: str, rng: np.random.Generator, seconds: float) -> np.ndarray:
    """(N,) float32: a harmonic tone at the emotion's pitch (+-4%), gated at its pulse rate, plus quiet noise."""
    pitch, rate, amp = SOUND[emotion]
    t = np.arange(int(seconds * SR)) / SR
    f0 = pitch * rng.uniform(0.96, 1.04)
    tone = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h for h in (1, 2, 3) if f0 * h < SR / 2)
    gate = 1.0 if rate == 0 else (np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)) > 0).astype(float)
    wave = amp * rng.uniform(0.85, 1.15) * 0.6 * tone * gate + 0.01 * rng.standard_normal(len(t))
    return np.clip(wave, -1, 1).astype(np.float32)


def write_mp4(path: Path, wave: np.ndarray, video: bool = True) -> None:
    """An mp4 with an AAC mono track at SR and (optionally) a 16x16 MPEG-4 video track at 5 fps."""
    with av.open(str(path), mode="w", format="mp4") as out:
        vstream = None
        if video:
            vstream = out.add_stream("mpeg4", rate=5)
            vstream.width = vstream.height = 16
            vstream.pix_fmt = "yuv420p"
        astream = out.add_stream("aac", rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SR, 0, Fraction(1, SR)
        for packet in astream.encode(frame):
            out.mux(packet)
        for packet in astream.encode(None):
            out.mux(packet)
        if vstream is not None:
            for i in range(int(len(wave) / SR * 5) or 1):
                image = np.full((16, 16, 3), (i * 40) % 255, dtype=np.uint8)
                vframe = av.VideoFrame.from_ndarray(image, format="rgb24")
                vframe.pts = i
                for packet in vstream.encode(vframe):
                    out.mux(packet)
            for packet in vstream.encode(None):
                out.mux(packet)


def csv_bytes(records: list[list]) -> bytes:
    """The CSV in cp1252 (as MELD ships it), except for the UTF-8 line; <BAD> becomes the raw byte 0x81."""
    lines = []
    for record in [HEADER, *records]:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerow(record)
        text = buf.getvalue()
        if "café" in text:
            lines.append(text.encode("utf-8"))
        else:
            lines.append(text.encode("cp1252").replace(b"<BAD>", b"\x81"))  # 0x81: undefined in cp1252
    return b"".join(lines)


def utterance(emotion: str, index: int, rng: np.random.Generator) -> str:
    """The cue sentence with a name and a filler; a few carry the quirks of the real CSVs."""
    text = f"{rng.choice(SPEAKERS)}, {CUES[emotion]}"
    if index % 5 == 1:
        text += " I can\u2019t believe it."  # U+2019 becomes b"\x92" in cp1252
    if index % 5 == 2:
        text += " at the café"  # this line is written as UTF-8
    if index % 5 == 3:
        text += " <BAD>"  # this line gets the raw byte 0x81
    return text


def clip_dir(root: Path, layout: str, split: str) -> Path:
    if layout == "raw":
        return root / RAW_CLIP_DIRS[split]
    return root / "meld" / split / "videofiles"


def csv_path(root: Path, layout: str, split: str) -> Path:
    return root / f"{split}_sent_emo.csv" if layout == "raw" else root / "meld" / split / f"{split}_sent_emo.csv"


def write_meld(root: Path, layout: str = "raw", per_emotion: dict[str, int] | None = None,
               neutral_factor: int = 2, seconds: float = 1.0, corrupt: bool = True, seed: int = 0) -> dict:
    """Write a MELD corpus; returns {split: [(clip id, emotion, utterance as read back), ...]} of the CSV rows.

    Neutral gets `neutral_factor` times as many clips (MELD is mostly neutral). With `corrupt`, the test
    split also lists dia999_utt0.mp4, whose bytes are not a media file (a decode reject).
    """
    per_emotion = per_emotion or {"train": 8, "dev": 5, "test": 5}
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in per_emotion.items():
        folder = clip_dir(root, layout, split)
        folder.mkdir(parents=True, exist_ok=True)
        records, rows = [], []
        for e, emotion in enumerate(EMOTIONS):
            for i in range(count * (neutral_factor if emotion == "neutral" else 1)):
                dia, utt = e * 100 + i // 3, i % 3
                text = utterance(emotion, len(records), rng)
                write_mp4(folder / f"dia{dia}_utt{utt}.mp4", emotion_wave(emotion, rng, seconds), video=i % 2 == 0)
                records.append([len(records) + 1, text, str(rng.choice(SPEAKERS)), emotion.capitalize(),
                                "neutral", dia, utt, 3, 7, "00:14:38,127", "00:14:40,164"])
                rows.append((f"{split}/dia{dia}_utt{utt}", emotion, text.replace("<BAD>", "\x81")))
        if corrupt and split == "test":
            (folder / "dia999_utt0.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 3)
            records.append([len(records) + 1, "Joey, yay I am so happy", "Joey", "Joy", "positive", 999, 0, 1, 1,
                            "00:00:01,000", "00:00:02,000"])
            rows.append((f"{split}/dia999_utt0", "joy", "Joey, yay I am so happy"))
        csv_path(root, layout, split).write_bytes(csv_bytes(records))
        written[split] = rows
    return written
