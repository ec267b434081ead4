"""ONNX export of the two towers, and an ONNX Runtime runner that reads the export back.

    export_onnx(model, "out/", audio_input="mel")        # out/audio.onnx, out/text.onnx, out/onnx_export.json
    export_onnx(model, "q/", quantize="int8")              # the same, the linear layers in dynamic int8
    towers = OnnxTowers("out/")
    towers.embed_audio(["dog.wav", "rain.mp3"])            # (2, D) from files, like ClapModel.embed_audio
    towers.embed_waveforms(waves_48k)                      # (N, D) from decoded clips, like embed_waveforms
    towers.embed_text(["a dog barks"])                     # (1, D), tokenized by the export's tokenizer/
    towers.encode_mel(mel, is_longer)                      # (B, D) unit embeddings, like ClapModel.encode_mel
    towers.encode_text(input_ids, attention_mask)          # (B, D)

Both graphs have a dynamic batch axis. The audio graph takes log-mel (B, C, T, F) + is_longer (B, 1), or
(audio_input="waveform") fixed-length 48 kHz waveforms (B, clip_samples) already cropped/padded to the
model's window (clap_core.model.frontend.crop_or_pad_tensor), with the STFT and mel filterbank inside the graph.
Text ids may be up to max_length long (dynamic sequence axis). The folder also holds the model's tokenizer/, so
that it embeds audio and captions on its own: `clap embed --checkpoint EXPORT` and `clap search --checkpoint
EXPORT` take it in place of a checkpoint (load_embedder). This module writes and reads the folder; its file
names and the check that reads no graph are clap_core.model.folders'.

quantize="int8" is ONNX Runtime's dynamic quantization of the towers' nn.Linear layers that run per patch or
per token (MatMul nodes, found by their weights in the graph): int8 weights per output channel in a 7-bit
range (the u8 x s8 kernels of AVX2 CPUs without VNNI saturate a 16-bit sum otherwise), uint8 activations
scaled per batch. The layers that run once per clip or caption (projection heads, a pooler: Gemm nodes, which
ORT's dynamic quantization does not cover, and a negligible share of the time), the STFT, the mel filterbank,
convolutions and the attention products stay fp32. README ("Exact or fast inference") has the measured speed
and cosines.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from clap_core.config import CheckpointError
from clap_core.model.folders import AUDIO_FILE, META_FILE, TEXT_FILE, TOKENIZER_DIR, check_export, is_onnx_export  # noqa: F401
from clap_core.runtime import logger_at

if TYPE_CHECKING:
    import onnx

    from clap_core.model.clap import ClapModel
    from clap_core.model.frontend import AudioFrontend

AudioInput = Literal["mel", "waveform"]
Quantize = Optional[Literal["int8"]]


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
    with _quiet_exporter():
        program = torch.onnx.export(module, args, input_names=input_names, output_names=["embeddings"],
                                    dynamic_shapes=tuple(dims.get(n, {}) for n in input_names),
                                    opset_version=opset, dynamo=True, optimize=True, verbose=False)
    program.save(str(path))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's notes that concern neither the graph nor the user (torchvision's detection ops are not
    registered; a pytree deprecation inside torch.export), kept off the console for the export only."""
    with logger_at(logging.getLogger("torch.onnx._internal.exporter._registration"), logging.ERROR), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.* is deprecated", category=FutureWarning)
        yield


def export_onnx(model: "ClapModel", output: str | Path, audio_input: AudioInput = "mel", opset: int = 20,
                quantize: Quantize = None) -> Path:
    """Write audio.onnx, text.onnx, tokenizer/ and onnx_export.json (input layout, front end, window, embedding
    size, quantization) into `output`; quantize="int8" stores the per-token linear layers in dynamic int8. Opset 20
    (the default) has GELU as one operator, which ONNX Runtime runs 5-10% faster than opset 18's erf expansion."""
    if audio_input not in ("mel", "waveform"):
        raise ValueError(f"audio_input must be 'mel' or 'waveform', got {audio_input!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    model.require_text_tower("export_onnx")  # an export holds both towers
    if getattr(model.audio_encoder, "takes_waveform", False):
        raise ValueError(f"cannot export the {model.config.audio_encoder.type} speech tower to ONNX: it computes its "
                         "own 16 kHz features from waveforms with per-clip lengths (resampling, masks), which "
                         "neither audio input of this export represents; use the checkpoint with clap embed")
    if model.config.audio.fusion:
        raise ValueError("cannot export a fused HTS-AT to ONNX: its fusion branch picks clips by is_longer, a "
                         "data-dependent index torch.export cannot trace; export the unfused variant")
    if quantize:
        try:  # the `onnx` extra; fail before the export's minutes, not after
            import onnxruntime.quantization  # noqa: F401
        except ImportError as e:
            raise ValueError("quantize='int8' needs ONNX Runtime: pip install 'clap-at-scale[onnx]'") from e
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with torch.no_grad():
        if audio_input == "mel":
            audio_tower = MelAudioTower(model).eval()
            _export(audio_tower, example_audio_inputs(model, "mel"), output / AUDIO_FILE,
                    ["mel", "is_longer"], {"mel": [0], "is_longer": [0]}, opset)
        else:
            audio_tower = WaveformAudioTower(model).eval()
            _export(audio_tower, example_audio_inputs(model, "waveform"), output / AUDIO_FILE,
                    ["waves"], {"waves": [0]}, opset)
        batch = model.tokenize(["a dog barks in the rain", "glass"])
        text_tower = TextTower(model).eval()
        _export(text_tower, (batch["input_ids"], batch["attention_mask"]), output / TEXT_FILE,
                ["input_ids", "attention_mask"],
                {"input_ids": [0, 1], "attention_mask": [0, 1]}, opset)
    model.tokenizer.save_pretrained(str(output / TOKENIZER_DIR))
    quantized = None
    if quantize:
        quantized = {"audio": quantize_linears(output / AUDIO_FILE, audio_tower),
                     "text": quantize_linears(output / TEXT_FILE, text_tower)}
    meta = {"audio_input": audio_input, "embed_dim": model.config.embed_dim,
            "sample_rate": model.config.audio.sample_rate, "clip_samples": model.frontend.clip_samples,
            "frames": model.frontend.frames, "n_mels": model.config.audio.n_mels,
            "views": 4 if model.config.audio.fusion else 1, "max_length": model.config.text_encoder.max_length,
            "model": model.config.name, "opset": opset,
            "audio": dataclasses.asdict(model.config.audio),  # the front end's arguments (OnnxTowers.embed_audio)
            "tokenizer": TOKENIZER_DIR, "quantize": quantize, "quantized_linears": quantized}
    (output / META_FILE).write_text(json.dumps(meta, indent=2))
    return output


def linear_matmuls(graph: "onnx.ModelProto", module: nn.Module) -> list[str]:
    """Names of the graph's MatMul nodes that are `module`'s nn.Linear layers: those whose constant right-hand
    side equals a layer's transposed weight (the exporter folds the transpose into the initializer). A linear
    layer on 2-d inputs is exported as a Gemm instead, and is not listed."""
    from onnx import numpy_helper

    weights: dict[tuple, list[np.ndarray]] = {}
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach().cpu().float().numpy().T  # (in, out), as MatMul takes it
            weights.setdefault(w.shape, []).append(w)
    constants = {t.name: t for t in graph.graph.initializer}
    names = []
    for node in graph.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in constants:
            continue
        rhs = numpy_helper.to_array(constants[node.input[1]])
        if any(np.array_equal(rhs, w) for w in weights.get(rhs.shape, [])):
            names.append(node.name)
    return names


def quantize_linears(path: Path, module: nn.Module) -> int:
    """Rewrite the graph at `path` with `module`'s linear layers that are MatMul nodes (linear_matmuls) in dynamic
    int8 (ONNX Runtime's quantize_dynamic: int8 weights per output channel, 7-bit range; uint8 activations);
    returns their number."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(path))
    names = linear_matmuls(graph, module)
    if not names:
        return 0
    staged = path.with_name(path.stem + ".int8.tmp")
    # its advice to run ORT's shape pre-processing first goes to the root logger
    with logger_at(logging.getLogger(), logging.ERROR):
        try:
            quantize_dynamic(graph, str(staged), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True, op_types_to_quantize=["MatMul"], nodes_to_quantize=names)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
    os.replace(staged, path)
    return len(names)


def load_embedder(path: str | Path, threads: int | None = None):
    """What embeds audio and captions from the local folder `path`: OnnxTowers (ONNX Runtime, `threads` intra-op
    threads) for an export_onnx folder, else ClapModel.from_pretrained (a save_pretrained checkpoint or a
    transformers CLAP folder). Both have embed_audio(audio, sample_rate, batch_size) and embed_text(texts)."""
    if is_onnx_export(path):
        check_export(path)
        return OnnxTowers(path, threads=threads)
    from clap_core.model.clap import ClapModel

    return ClapModel.from_pretrained(path)


class OnnxTowers:
    """ONNX Runtime sessions over an export_onnx folder; numpy in, numpy out."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort  # optional dependency: the `onnx` extra

        self.path = path = Path(path)
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

    def embed_audio(self, audio, sample_rate: int | None = None, batch_size: int = 8,
                    decode_threads: int = 1) -> np.ndarray:
        """Paths or arrays (any rate when sample_rate is given) -> (N, D) unit embeddings, computed as
        ClapModel.embed_audio(long_audio="window_mean") computes them: decoded a batch ahead, then
        embed_waveforms."""
        from clap_core.model import inference

        return inference.decode_ahead(audio, sample_rate, batch_size, decode_threads,
                                      lambda waves: self.embed_waveforms(waves, batch_size))

    def embed_waveforms(self, waves, batch_size: int = 8) -> np.ndarray:
        """48 kHz mono waves -> (N, D) unit embeddings, as inference.embed_waveforms computes them for an unfused
        model: a clip longer than the window as the renormalised mean of its windows, the window padded as the
        model pads it; the log-mel of a mel graph by the model's own front end (torch, fp32), then this graph."""
        from clap_core.model import inference

        frontend = self.frontend

        @torch.no_grad()
        def encode(padded: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:  # (b, max N), (b,) -> (b, D)
            if self.meta["audio_input"] == "mel":
                mel, is_longer = frontend(padded, lengths)  # (b, 1, T, F), (b, 1)
                return self.encode_mel(mel.numpy(), is_longer.numpy())
            fixed, _ = frontend.fixed_waveforms(padded, lengths)  # (b, clip_samples)
            return self.encode_waveform(fixed.numpy())

        def encode_windows(windows: list[np.ndarray]) -> np.ndarray:  # at most window-long waves -> (n, D)
            return inference.embed_batches(encode, windows, batch_size, self.meta["embed_dim"])

        return inference.window_mean(encode_windows, waves, self.meta["clip_samples"])

    @functools.cached_property
    def frontend(self) -> "AudioFrontend":
        """The model's log-mel front end and window padding, rebuilt from the export's settings (eval mode)."""
        from clap_core.model.frontend import AudioFrontend

        if "audio" not in self.meta:  # what folders.check_export refuses too, named as it names it
            raise CheckpointError(f"{self.path / META_FILE}: this export predates embed_audio (no front-end "
                                  "settings): run clap export again")
        return AudioFrontend(**self.meta["audio"]).eval()

    def embed_text(self, texts, batch_size: int = 64) -> np.ndarray:
        """Captions -> (N, D) unit embeddings, tokenized as the model tokenizes them (the export's tokenizer/),
        like ClapModel.embed_text."""
        from clap_core.model.encoders.text import tokenize
        from clap_core.model.inference import batched

        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [self.encode_text(**{name: ids.numpy() for name, ids in
                                   tokenize(self.tokenizer, chunk, self.meta["max_length"]).items()})
               for chunk in batched(texts, batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.meta["embed_dim"]), np.float32)

    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer, saved in the export's tokenizer/."""
        from clap_core.model.encoders.text import build_tokenizer

        folder = self.path / TOKENIZER_DIR
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: missing, this export predates embed_text: run clap export again")
        return build_tokenizer(str(folder.resolve()), self.meta["max_length"])

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, L) ids and mask -> (B, D)."""
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64)}
        return self.text.run(None, feeds)[0]

    def _need(self, kind: str) -> None:
        if self.meta["audio_input"] != kind:
            raise ValueError(f"this export's audio graph takes {self.meta['audio_input']}, not {kind}")
