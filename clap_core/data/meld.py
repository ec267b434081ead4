"""MELD (Multimodal EmotionLines Dataset) on disk -> input rows for `clap embed`.

    layout = find_layout("data/MELD.Raw")          # either release layout, see below
    rows, bad = read_meld("data/MELD.Raw")         # one row per CSV line; bad = reject records of CSV lines
                                                   # that are not a clip (clap_core.data.rejects)
    write_inputs(rows, "out/manifest.jsonl")      # the input list handed to `clap embed`

Two layouts are recognised:
    MELD.Raw    train_sent_emo.csv, dev_sent_emo.csv, test_sent_emo.csv and the clip folders train_splits/,
                dev_splits_complete/, output_repeated_splits_test/ (beside the CSVs or in train/, dev/, test/)
    reorganised meld/{train,dev,test}/{split}_sent_emo.csv with the clips in meld/{split}/videofiles/
Clips are named dia{Dialogue_ID}_utt{Utterance_ID}.mp4; their audio track is decoded later by the embedding
job. A row whose clip is missing keeps its path and is rejected there as missing_file, so it is counted.

The CSVs are not clean UTF-8 (cp1252 quotes such as b"\\x92"): each line is decoded as UTF-8, else cp1252,
else latin-1, so no line is lost and no byte turns into U+FFFD.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from clap_core import storage
from clap_core.data.rejects import Reject, reject

EMOTIONS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
SPLITS = ("train", "dev", "test")
RAW_CLIP_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
REQUIRED_COLUMNS = ("Utterance", "Emotion", "Dialogue_ID", "Utterance_ID")
READ_STAGE = "read_meld"  # the reject stage of a CSV line that is not a clip


@dataclass(frozen=True)
class SplitFiles:
    csv: Path
    clips: Path


def clip_name(dialogue_id: int | str, utterance_id: int | str) -> str:
    return f"dia{int(dialogue_id)}_utt{int(utterance_id)}.mp4"


# -------------------------------------------------------------------------------------------------
# layout detection


def raw_layout(root: Path) -> dict[str, SplitFiles] | None:
    """MELD.Raw: CSVs in root; clip folders in root or root/<split>/ (how the nested tarballs unpack)."""
    if not all((root / f"{s}_sent_emo.csv").is_file() for s in SPLITS):
        return None
    layout = {}
    for split, folder in RAW_CLIP_DIRS.items():
        candidates = [root / folder, root / split / folder]
        clips = next((c for c in candidates if c.is_dir()), candidates[0])
        layout[split] = SplitFiles(root / f"{split}_sent_emo.csv", clips)
    return layout


def reorganised_layout(root: Path) -> dict[str, SplitFiles] | None:
    """meld/{split}/{split}_sent_emo.csv + meld/{split}/videofiles/; root may be meld/ or its parent."""
    for base in (root / "meld", root):
        if all((base / s / f"{s}_sent_emo.csv").is_file() for s in SPLITS):
            return {s: SplitFiles(base / s / f"{s}_sent_emo.csv", base / s / "videofiles") for s in SPLITS}
    return None


def find_layout(root: str | Path) -> dict[str, SplitFiles]:
    """split -> (CSV, clip folder) of either layout; FileNotFoundError says what was looked for."""
    root = Path(root).expanduser().resolve()
    layout = raw_layout(root) or reorganised_layout(root)
    if layout is None:
        raise FileNotFoundError(
            f"{root} is not a MELD folder: expected {{train,dev,test}}_sent_emo.csv (MELD.Raw) or "
            f"meld/{{train,dev,test}}/{{split}}_sent_emo.csv (reorganised)")
    return layout


# -------------------------------------------------------------------------------------------------
# CSV reading


def decode_line(line: bytes) -> str:
    """One CSV line: UTF-8 when valid, else cp1252 (MELD's smart quotes), else latin-1 (never fails)."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return line.decode(encoding)
        except UnicodeDecodeError:
            continue
    return line.decode("latin-1")


def decode_csv_bytes(data: bytes) -> str:
    text = "".join(decode_line(line) for line in data.splitlines(keepends=True))
    return text[1:] if text.startswith("\ufeff") else text


def read_csv_records(path: str | Path) -> list[dict]:
    """The CSV's rows as dicts with stripped header names."""
    reader = csv.DictReader(io.StringIO(decode_csv_bytes(Path(path).read_bytes()), newline=""))
    missing = [c for c in REQUIRED_COLUMNS if c not in [h.strip() for h in reader.fieldnames or []]]
    if missing:
        raise ValueError(f"{path}: missing MELD column(s) {missing}; header is {reader.fieldnames}")
    return [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]


def row_from_record(record: dict, split: str, clips: Path, line: int) -> tuple[dict | None, Reject | None]:
    """(input row, None) or (None, reject record) for one CSV record."""
    source = f"{split}_sent_emo.csv:{line}"
    emotion = record["Emotion"].lower()
    try:
        name = clip_name(record["Dialogue_ID"], record["Utterance_ID"])
    except ValueError:
        return None, reject({"id": f"{split}/line{line}", "source_path": source}, READ_STAGE, "bad_ids",
                            f"Dialogue_ID={record['Dialogue_ID']!r} Utterance_ID={record['Utterance_ID']!r}")
    clip_id = f"{split}/{name[:-4]}"
    if emotion not in EMOTIONS:
        return None, reject({"id": clip_id, "source_path": source}, READ_STAGE, "unknown_emotion",
                            f"{record['Emotion']!r} not in {EMOTIONS}")
    row = {"id": clip_id, "audio_path": str(clips / name), "caption": record["Utterance"], "label": emotion,
           "split": split, "speaker": record.get("Speaker", ""), "sentiment": record.get("Sentiment", "")}
    return row, None


def read_meld(root: str | Path, splits: tuple[str, ...] = SPLITS) -> tuple[list[dict], list[Reject]]:
    """(input rows of every split, reject records of the CSV lines that are not a clip) in CSV order."""
    layout = find_layout(root)
    rows, rejects = [], []
    for split in splits:
        files = layout[split]
        for line, record in enumerate(read_csv_records(files.csv), start=2):  # line 1 is the header
            row, bad = row_from_record(record, split, files.clips, line)
            rows += [row] if row else []
            rejects += [bad] if bad else []
    return rows, rejects


def write_inputs(rows: list[dict], uri: str) -> None:
    """The JSONL input list for `clap embed` (absolute audio paths, UTF-8), local or s3://, written atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    storage.put_atomic(str(uri), text.encode("utf-8"))
