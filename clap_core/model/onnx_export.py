"""ONNX export of the two towers, and an ONNX Runtime runner that reads the export back.

    export_onnx(model, "out/", audio_input="mel")        # out/audio.onnx, out/text.onnx, out/onnx_export.json
    towers = OnnxTowers("out/")
    towers.encode_mel(mel, is_longer)                      # (B, D) unit embeddings, like ClapModel.encode_mel
    towers.encode_text(input_ids, attention_mask)          # (B, D)

Both graphs have a dynamic batch axis. The audio graph takes log-mel (B, C, T, F) + is_longer (B, 1), or
(audio_input="waveform") fixed-length 48 kHz waveforms (B, clip_samples) already cropped/padded to the
model's window (clap_core.model.frontend.crop_or_pad_tensor), with the STFT and mel filterbank inside the graph.
Text ids may be up to max_length long (dynamic sequence axis). This module owns the folder's format.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from clap_core.model.clap import ClapModel

AUDIO_FILE, TEXT_FILE, META_FILE = "audio.onnx", "text.onnx", "onnx_export.json"
AudioInput = Literal["mel", "waveform"]


class MelAudioTower(nn.Module):
    """log-mel (B, C, T, F) + is_longer (B, 1) -> unit audio embeddings (B, D)."""

    def __init__(self, model: "ClapModel"):
        super().__init__()
        self.model = model

    def forward(self, mel: torch.Tensor, is_longer: torch.Tensor) -> torch.Tensor:
        return self.model.encode_mel(mel, is_longer.bool())


class WaveformAudioTower(nn.Module):
    """Waveforms (B, clip_samples) at the model's rate -> unit audio embeddings (B, D)."""

    def __init__(self, model: "ClapModel"):
        super().__init__()
        self.model = model
        self.views = 4 if model.config.audio.fusion else 1  # a window-length clip: the same view 4 times

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        mel = self.model.frontend.logmel(waves)[:, None]  # (B, 1, T, F)
        mel = mel.expand(-1, self.views, -1, -1)
        is_longer = torch.zeros(waves.shape[0], 1, dtype=torch.bool, device=waves.device)
        return self.model.encode_mel(mel, is_longer)


class TextTower(nn.Module):
    """Token ids (B, L) + attention mask (B, L) -> unit text embeddings (B, D); no id range checks in the graph."""

    def __init__(self, model: "ClapModel"):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = self.model.text_projection(self.model.text_encoder(input_ids, attention_mask))
        return F.normalize(emb, dim=-1)


def example_audio_inputs(model: "ClapModel", audio_input: AudioInput, batch: int = 2) -> tuple[torch.Tensor, ...]:
    frontend = model.frontend
    waves = torch.randn(batch, frontend.clip_samples) * 0.1
    if audio_input == "waveform":
        return (waves,)
    mel, is_longer = frontend(waves)
    return mel, is_longer.to(torch.int64)


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], dynamic: dict, opset: int) -> None:
    # torch.export (dynamo) keeps batch and token axes symbolic; the TorchScript tracer baked them in.
    dims = {name: {axis: torch.export.Dim.DYNAMIC for axis in axes} for name, axes in dynamic.items()}
    program = torch.onnx.export(module, args, input_names=input_names, output_names=["embeddings"],
                                dynamic_shapes=tuple(dims.get(n, {}) for n in input_names), opset_version=opset,
                                dynamo=True, optimize=True, verbose=False)
    program.save(str(path))


def export_onnx(model: "ClapModel", output: str | Path, audio_input: AudioInput = "mel", opset: int = 18) -> Path:
    """Write audio.onnx, text.onnx and onnx_export.json (input layout, window, embedding size) into `output`."""
    if audio_input not in ("mel", "waveform"):
        raise ValueError(f"audio_input must be 'mel' or 'waveform', got {audio_input!r}")
    if getattr(model.audio_encoder, "takes_waveform", False):
        raise ValueError(f"cannot export the {model.config.audio_encoder.type} speech tower to ONNX: it computes its "
                         "own 16 kHz features from waveforms with per-clip lengths (resampling, masks), which "
                         "neither audio input of this export represents; use the checkpoint with clap embed")
    if model.config.audio.fusion:
        raise ValueError("cannot export a fused HTS-AT to ONNX: its fusion branch picks clips by is_longer, a "
                         "data-dependent index torch.export cannot trace; export the unfused variant")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with torch.no_grad():
        if audio_input == "mel":
            _export(MelAudioTower(model), example_audio_inputs(model, "mel"), output / AUDIO_FILE,
                    ["mel", "is_longer"], {"mel": [0], "is_longer": [0]}, opset)
        else:
            _export(WaveformAudioTower(model), example_audio_inputs(model, "waveform"), output / AUDIO_FILE,
                    ["waves"], {"waves": [0]}, opset)
        batch = model.tokenize(["a dog barks in the rain", "glass"])
        _export(TextTower(model), (batch["input_ids"], batch["attention_mask"]), output / TEXT_FILE,
                ["input_ids", "attention_mask"],
                {"input_ids": [0, 1], "attention_mask": [0, 1]}, opset)
    meta = {"audio_input": audio_input, "embed_dim": model.config.embed_dim,
            "sample_rate": model.config.audio.sample_rate, "clip_samples": model.frontend.clip_samples,
            "frames": model.frontend.frames, "n_mels": model.config.audio.n_mels,
            "views": 4 if model.config.audio.fusion else 1, "max_length": model.config.text_encoder.max_length,
            "model": model.config.name, "opset": opset}
    (output / META_FILE).write_text(json.dumps(meta, indent=2))
    return output


class OnnxTowers:
    """ONNX Runtime sessions over an export_onnx folder; numpy in, numpy out."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort  # optional dependency: the `onnx` extra

        path = Path(path)
        self.meta = json.loads((path / META_FILE).read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.audio = ort.InferenceSession(str(path / AUDIO_FILE), options, providers=providers)
        self.text = ort.InferenceSession(str(path / TEXT_FILE), options, providers=providers)
        self._audio_inputs = {i.name for i in self.audio.get_inputs()}  # unfused graphs drop is_longer

    def encode_mel(self, mel: np.ndarray, is_longer: np.ndarray) -> np.ndarray:
        """(B, C, T, F) log-mel + (B, 1) flags -> (B, D)."""
        self._need("mel")
        feeds = {"mel": np.asarray(mel, np.float32), "is_longer": np.asarray(is_longer).astype(np.int64)}
        return self.audio.run(None, {k: v for k, v in feeds.items() if k in self._audio_inputs})[0]

    def encode_waveform(self, waves: np.ndarray) -> np.ndarray:
        """(B, clip_samples) window-length waveforms -> (B, D)."""
        self._need("waveform")
        waves = np.asarray(waves, np.float32)
        if waves.ndim != 2 or waves.shape[1] != self.meta["clip_samples"]:
            raise ValueError(f"waves must be (batch, {self.meta['clip_samples']}), got {waves.shape}: "
                             "crop or pad to the model's window first (clap_core.model.frontend.crop_or_pad_tensor)")
        return self.audio.run(None, {"waves": waves})[0]

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, L) ids and mask -> (B, D)."""
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64)}
        return self.text.run(None, feeds)[0]

    def _need(self, kind: str) -> None:
        if self.meta["audio_input"] != kind:
            raise ValueError(f"this export's audio graph takes {self.meta['audio_input']}, not {kind}")
