"""`clap export`: a checkpoint in a format other tools load.

    clap export --checkpoint runs/a/final --format transformers --output hf/   # transformers.ClapModel folder
    clap export --checkpoint runs/a/final --format onnx --output onnx/ [--audio-input waveform] [--quantize int8]

transformers: config.json + model.safetensors + tokenizer + preprocessor_config.json, loadable offline by
ClapModel / ClapProcessor / pipeline("zero-shot-audio-classification"); HTS-AT + RoBERTa models only.
onnx: audio.onnx (log-mel or window-length waveforms in) + text.onnx, dynamic batch, and onnx_export.json;
--quantize int8 stores the linear layers in ONNX Runtime's dynamic int8 (faster on CPUs, not exact: README).
An architecture the format cannot represent is refused with the reason; nothing is written then.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clap_core.model.clap import ClapModel
from clap_core.storage import local_copy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="save_pretrained folder (local or s3://)")
    parser.add_argument("--format", required=True, choices=["transformers", "onnx"], help="export format")
    parser.add_argument("--output", required=True, help="local folder to create (must not exist or be empty)")
    parser.add_argument("--audio-input", choices=["mel", "waveform"], default="mel",
                        help="onnx: the audio graph's input, log-mel (B,C,T,F) or 48 kHz waveforms (B, window)")
    parser.add_argument("--opset", type=int, default=20, help="onnx: opset version (20: GELU as one op)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="onnx: the linear layers in dynamic int8 (ONNX Runtime; not exact, see README)")


def export(checkpoint: str, fmt: str, output: str, audio_input: str = "mel", opset: int = 20,
           quantize: str | None = None) -> Path:
    if quantize and fmt != "onnx":
        raise ValueError(f"--quantize applies to --format onnx, not {fmt}")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose a new folder (nothing is overwritten)")
    model = ClapModel.from_pretrained(local_copy(checkpoint))
    if fmt == "transformers":
        from clap_core.model.laion import export_transformers

        return export_transformers(model, out)
    from clap_core.model.onnx_export import export_onnx

    return export_onnx(model, out, audio_input=audio_input, opset=opset, quantize=quantize)


def run(args: argparse.Namespace) -> int:
    try:
        out = export(args.checkpoint, args.format, args.output, args.audio_input, args.opset, args.quantize)
    except ValueError as e:  # an architecture the format cannot hold, or an occupied output folder
        print(f"clap export: {e}", file=sys.stderr)
        return 2
    print(f"{args.format} export of {args.checkpoint} in {out}")
    return 0
