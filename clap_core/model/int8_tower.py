"""precision="int8": the audio encoder in static int8, compiled ahead of time, on CPU.

    tower = compiled_audio_encoder(model)   # built once per machine and weights (~2 min), then loaded (~8 s)
    feats = tower(mel, is_longer)           # (B, C, T, F) log-mel -> (B, H), as model.audio_encoder

The fp32 encoder is exported (`torch.export`, strict: PT2E's quantizer finds the layers by the source
functions that only a strict export records), quantized by torchao's PT2E flow with the X86 Inductor quantizer
(int8 weights per output channel, uint8 activations per tensor), calibrated on CALIBRATION_CLIPS synthetic clips
made here, and compiled by AOTInductor with freezing (oneDNN's u8 x s8 kernels, elementwise ops fused into them).
Measured on this project's 2-core AVX-512 BF16 + VNNI CPU: 1.4-1.6x the bf16 path end to end, min cosine to fp32
0.9997 on decoded clips it was not calibrated on (README, "Exact or fast inference").

Calibration is fixed, not taken from the data being embedded: the same weights give the same int8 model on
every machine and in every job, so embeddings of one corpus made by several jobs agree. The clips span what
real audio puts into the log-mel (silence to full scale, noise, tones, sweeps, clicks, clipped and
speech-like bursts).

The compiled package (a shared library + the int8 weights) lives in a cache folder of this user's
(CLAP_CACHE_DIR, default ~/.cache/clap-at-scale), named by a digest of the encoder's weights, the torch and
torchao versions and the CPU's instruction sets; a file lock lets one process of a machine
build it while the others wait. Only packages this code wrote are loaded: a checkpoint never carries compiled
code.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from clap_core.runtime import evaluating, logger_at

INT8_BATCH = 8  # clips per call of the compiled encoder: a batch is cut into, and the last part padded to, 8
CALIBRATION_CLIPS = 16  # synthetic clips the activation ranges are observed on (two batches)
PACKAGE_FORMAT = 2  # bumped when the export, quantizer settings or calibration change: old packages not reused


def cache_root() -> Path:
    return Path(os.environ.get("CLAP_CACHE_DIR") or Path.home() / ".cache" / "clap-at-scale") / "int8"


def check_int8(model: nn.Module) -> None:
    """Refuse what the int8 path cannot run, with the reason."""
    if model.device.type != "cpu":
        raise ValueError(f"precision='int8' runs on CPU (oneDNN's int8 kernels); on {model.device.type} use bf16")
    if getattr(model.audio_encoder, "takes_waveform", False):
        raise ValueError(f"precision='int8' compiles log-mel audio encoders; the {model.config.audio_encoder.type} "
                         "encoder reads the waveform: use bf16")
    if model.config.audio.fusion:
        raise ValueError("precision='int8' compiles one window per clip; a fusion model's input depends on the "
                         "clip's length: use bf16")
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise ValueError("precision='int8' needs torchao: pip install 'clap-at-scale[int8]'") from e


def calibration_waves(samples: int, sr: int) -> list[np.ndarray]:
    """CALIBRATION_CLIPS deterministic clips of `samples` samples at `sr`, float32 in [-1, 1]."""
    rng = np.random.default_rng(0)
    t = np.arange(samples) / sr
    level = lambda x, dbfs: x * (10 ** (dbfs / 20) / max(np.sqrt(np.mean(x ** 2)), 1e-12))  # noqa: E731
    white = lambda: rng.standard_normal(samples)  # noqa: E731
    spectrum = np.fft.rfft(white())
    pink = np.fft.irfft(spectrum / np.sqrt(np.maximum(np.arange(len(spectrum)), 1)), n=samples)  # power ~ 1/f
    chirp = np.sin(2 * np.pi * (30 * t + (sr / 2.2 - 30) / (2 * t[-1]) * t ** 2))  # 30 Hz -> ~22 kHz
    partials = sum(np.sin(2 * np.pi * 220 * k * t) / k for k in range(1, 12)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2  # 4 bursts a second, as speech
    voiced = sum(np.sin(2 * np.pi * f * t) for f in (140, 700, 1200, 2600)) * syllables + 0.05 * white() * syllables
    clicks = np.zeros(samples)
    clicks[rng.integers(0, samples, 40)] = rng.uniform(-1, 1, 40)
    waves = [np.zeros(samples),  # digital silence: the log-mel floor
             level(white(), -60), level(white(), -40), level(white(), -20), level(white(), -6),
             level(pink, -30), level(pink, -12), level(chirp, -20), level(chirp, -3), level(partials, -15),
             level(voiced, -18), level(voiced, -6), clicks,
             np.clip(3 * np.sign(np.sin(2 * np.pi * 97 * t)), -1, 1),  # a full-scale square wave
             np.clip(level(voiced + partials, 0) * 2, -1, 1),  # mixed and clipped
             level(voiced, -25) + level(white(), -45)]  # speech over a noise floor
    assert len(waves) == CALIBRATION_CLIPS
    return [np.clip(w, -1, 1).astype(np.float32) for w in waves]


def package_key(model: nn.Module) -> str:
    """Digest of what the compiled package depends on: the encoder's weights and buffers, the input shape, the
    versions of torch and torchao, the CPU's instruction sets, this module's format."""
    import torchao

    digest = hashlib.sha256()
    for name, tensor in model.audio_encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    cpu = " ".join(sorted(f for f in _cpu_flags() if f.startswith(("avx", "amx", "fma"))))
    meta = [PACKAGE_FORMAT, INT8_BATCH, model.config.audio.sample_rate, model.frontend.clip_samples,
            torch.__version__, torchao.__version__, cpu]
    digest.update(repr(meta).encode())
    return digest.hexdigest()[:24]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


class CompiledAudioEncoder(nn.Module):
    """The compiled int8 encoder behind model.audio_encoder's interface: (B, C, T, F) log-mel (+ is_longer) ->
    (B, H) fp32, run INT8_BATCH clips at a time (the last part zero-padded, its padding dropped)."""

    def __init__(self, runner, mel_shape: tuple[int, ...], takes_is_longer: bool):
        super().__init__()
        self.runner, self.mel_shape, self.takes_is_longer = runner, tuple(mel_shape), takes_is_longer

    def __deepcopy__(self, memo: dict) -> "CompiledAudioEncoder":
        return self  # compiled code and frozen int8 weights: nothing a copy could change, and not copyable

    def forward(self, mel: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(mel.shape[1:]) != self.mel_shape:
            raise ValueError(f"the int8 encoder was compiled for log-mel (B, {self.mel_shape}), got {tuple(mel.shape)}")
        n = mel.shape[0]
        mel = mel.float()
        flags = torch.zeros(n, 1, dtype=torch.bool) if is_longer is None else is_longer.reshape(n, 1).bool()
        out = []
        for start in range(0, n, INT8_BATCH):
            part, part_flags = mel[start:start + INT8_BATCH], flags[start:start + INT8_BATCH]
            pad = INT8_BATCH - part.shape[0]
            if pad:
                part = torch.cat([part, part.new_zeros((pad,) + self.mel_shape)])
                part_flags = torch.cat([part_flags, part_flags.new_zeros(pad, 1)])
            out.append(self.runner(part, part_flags)[:INT8_BATCH - pad])  # (b, H): the export takes both
        return torch.cat(out)


class _Encoder(nn.Module):
    """The encoder with one signature for torch.export, (mel, is_longer), whether or not it reads is_longer."""

    def __init__(self, encoder: nn.Module, takes_is_longer: bool):
        super().__init__()
        self.encoder, self.takes_is_longer = encoder, takes_is_longer

    def forward(self, mel: torch.Tensor, is_longer: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel, is_longer) if self.takes_is_longer else self.encoder(mel)


def build_package(model: nn.Module, path: Path) -> None:
    """Export, quantize, calibrate and compile model.audio_encoder (fp32 weights) into an AOTInductor package."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86q

    frontend = model.frontend
    waves = torch.from_numpy(np.stack(calibration_waves(frontend.clip_samples, model.config.audio.sample_rate)))
    takes_is_longer = getattr(model.audio_encoder, "takes_is_longer", False)
    with torch.no_grad(), evaluating(model):
        batches = [frontend(waves[i:i + INT8_BATCH]) for i in range(0, len(waves), INT8_BATCH)]  # (mel, is_longer)
        encoder = _Encoder(model.audio_encoder, takes_is_longer).eval()
        example = (batches[0][0], batches[0][1].reshape(INT8_BATCH, 1).bool())
        with _quiet_compiler():
            graph = torch.export.export(encoder, example, strict=True).module()
        quantizer = x86q.X86InductorQuantizer().set_global(x86q.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        for mel, is_longer in batches:  # calibration: the observers see every batch
            prepared(mel, is_longer.reshape(INT8_BATCH, 1).bool())
        quantized = torch.export.export(convert_pt2e(prepared), example)
    staged = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with _quiet_compiler():
            # dynamic threads: the kernels ask OpenMP for the caller's thread count at each call; by default inductor
            # writes the builder's count into them (a Ray actor builds on its constructor's 1 thread and embeds on
            # its batches' N: its package ran at 0.4x the in-process one)
            torch._inductor.aoti_compile_and_package(quantized, package_path=str(staged),
                                                     inductor_configs={"freezing": True, "cpp.dynamic_threads": True})
        os.replace(staged, path)  # whole or absent: a crash mid-build leaves no package to load
    finally:
        staged.unlink(missing_ok=True)  # a failed build leaves nothing behind


def compiled_audio_encoder(model: nn.Module) -> CompiledAudioEncoder:
    """model.audio_encoder as the compiled int8 encoder, loaded from the cache or built into it (one process of
    the machine builds a package; the others wait on its lock, then load it)."""
    check_int8(model)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = root / f"audio-{package_key(model)}.pt2"
    with _locked(path.with_suffix(".lock")):
        if not path.exists():
            build_package(model, path)
    # Loading asks inductor which vector ISAs this CPU has, and by default it proves each by compiling and loading a
    # probe in a fresh Python (~2 s each, ~16 s per process); the package was built on this CPU's flags (its key),
    # so the flags in /proc/cpuinfo are taken as they are (inductor's documented TORCHINDUCTOR_VEC_ISA_OK): ~8 s
    with torch._inductor.config.patch({"cpp.vec_isa_ok": True}):
        runner = torch._inductor.aoti_load_package(str(path))
    with torch.no_grad(), evaluating(model):
        mel, _ = model.frontend(torch.zeros(1, model.frontend.clip_samples))
    return CompiledAudioEncoder(runner, tuple(mel.shape[1:]), getattr(model.audio_encoder, "takes_is_longer", False))


@contextlib.contextmanager
def _quiet_compiler():
    """The compiler's notes that concern neither the result nor the user (HTS-AT's cached attention masks seen as
    side effects; a tensor copied from a tensor inside inductor's oneDNN lowering; no CUDA runtime on a CPU
    machine), kept off the console while the package is built."""
    with logger_at(logging.getLogger("torch.utils.cpp_extension"), logging.ERROR), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*certain side effects happened", category=UserWarning)
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
        yield


@contextlib.contextmanager
def _locked(lock: Path):
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
