"""The model folders a `clap` command takes: a checkpoint (ClapModel.save_pretrained), a transformers CLAP folder
(imported by ClapModel.from_pretrained) and an ONNX export (`clap export --format onnx`): their file names, and
checks that read no tensor and import neither torch nor transformers.

    check_checkpoint("runs/a/final")   # -> its ClapModelConfig, or CheckpointError naming the path and problem
    is_transformers_folder("laion-clap-hf/"), check_transformers_folder("laion-clap-hf/")  # config.json folders
    is_onnx_export("onnx-int8/")       # True for an export folder
    check_export("onnx-int8/")         # -> its onnx_export.json, or CheckpointError

A job's driver checks the folder it was given before anything is written, and its decode workers import the
job's module: neither loads a model, so both stay clear of the ~5 s (2 cores) that importing torch and
transformers costs. clap_core.model.clap writes and reads checkpoints, clap_core.model.onnx_export exports;
both take their file names from here.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import yaml

from clap_core.config import CheckpointError, from_dict
from clap_core.model.config import ClapModelConfig

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "config.yaml", "model.safetensors", "tokenizer"  # a checkpoint
HF_CONFIG_FILE = "config.json"  # a transformers LAION-CLAP folder (ClapModel.from_pretrained imports it)
AUDIO_FILE, TEXT_FILE, META_FILE = "audio.onnx", "text.onnx", "onnx_export.json"  # an export (+ TOKENIZER_DIR)
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own bound on a file's JSON header


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."


def check_checkpoint(path: str | Path) -> ClapModelConfig:
    """Check a save_pretrained folder without building the model; returns its config. Raises CheckpointError
    naming the path and the problem: no folder, no or broken config.yaml, no tokenizer/, no or truncated
    model.safetensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (a checkpoint is the folder save_pretrained wrote)")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: holds no {CONFIG_FILE} (nor a transformers config.json): not a "
                              "checkpoint folder")
    try:
        config = from_dict(ClapModelConfig, yaml.safe_load((path / CONFIG_FILE).read_text()))
    except (yaml.YAMLError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: not a valid model config ({one_line(e)})") from None
    if not (path / TOKENIZER_DIR).is_dir():
        raise CheckpointError(f"{path / TOKENIZER_DIR}: missing (save_pretrained writes the tokenizer there)")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    check_safetensors(weights)
    return config


def is_transformers_folder(path: str | Path) -> bool:
    """Whether the local folder `path` is a transformers CLAP folder (config.json and no config.yaml): released
    LAION-CLAP weights or `clap export --format transformers`, which ClapModel.from_pretrained imports."""
    path = Path(path)
    return not (path / CONFIG_FILE).is_file() and (path / HF_CONFIG_FILE).is_file()


def check_transformers_folder(path: str | Path) -> None:
    """Check a transformers CLAP folder without building the model: config.json a JSON object of model_type
    "clap", and its model.safetensors, where it has one, whole (transformers reads the weights itself)."""
    path = Path(path)
    try:
        config = json.loads((path / HF_CONFIG_FILE).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path / HF_CONFIG_FILE}: unreadable ({one_line(e)})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clap":
        raise CheckpointError(f"{path / HF_CONFIG_FILE}: model_type {model_type!r}, not a transformers CLAP model "
                              "('clap')")
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        check_safetensors(weights)


def check_safetensors(path: Path) -> None:
    """CheckpointError naming `path` unless it is a whole safetensors file (safetensors_problems)."""
    try:
        safetensors_problems(path)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: a header of deeply nested JSON
        raise CheckpointError(f"{path}: unreadable, truncated or not a safetensors file ({one_line(e)})") from None


def safetensors_problems(path: Path) -> None:
    """Raise ValueError unless `path` is a whole safetensors file: an 8-byte little-endian header length, a JSON
    header of at most MAX_SAFETENSORS_HEADER bytes, and tensor data that ends exactly at the end of the file
    (a truncated copy shows there). Reads the header only, and no more of it than the file holds."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"its header claims {length} bytes, the file holds {size}")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    ends = [0]
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r}: no valid data_offsets in the header")
        ends.append(offsets[1])
    if 8 + length + max(ends) != size:
        raise ValueError(f"its tensors end at byte {8 + length + max(ends)}, the file holds {size}")


def is_onnx_export(path: str | Path) -> bool:
    """Whether the local folder `path` is an export_onnx folder (it has onnx_export.json), not a checkpoint."""
    return (Path(path) / META_FILE).is_file()


def check_export(path: str | Path) -> dict:
    """Check an export_onnx folder without opening its graphs; returns its onnx_export.json. Raises
    CheckpointError naming the path and the problem: unreadable settings, a missing graph, or an export from
    before exports embedded files and captions (no front-end settings or tokenizer/)."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / META_FILE}: unreadable ({one_line(e)})") from None
    for name in (AUDIO_FILE, TEXT_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing (export_onnx writes it)")
    if not isinstance(meta, dict) or "audio" not in meta or not (path / TOKENIZER_DIR).is_dir():
        raise CheckpointError(f"{path}: this ONNX export predates embedding files and captions (no front-end "
                              f"settings or {TOKENIZER_DIR}/): run clap export again")
    return meta
