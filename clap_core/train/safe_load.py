"""Load DeepSpeed training checkpoints without unpickling arbitrary objects.

A run folder lives on shared storage (an s3:// prefix others can write to), so it is data, not code.
DeepSpeed's own loader calls `torch.load(weights_only=False)`: a tampered `mp_rank_00_model_states.pt`
runs whatever its pickle says. Here every file of a checkpoint goes through `torch.load(weights_only=True)`
(tensors, containers, numbers, strings) plus the four plain DeepSpeed types its optimizer states hold,
and anything else is refused with `UntrustedCheckpointError` before a single object is built.

    engine = deepspeed.initialize(...)
    load_deepspeed_checkpoint(engine, folder, tag="deepspeed")   # resume / --export-only

Allow-list (what a ZeRO 0-3 checkpoint in fp32 / bf16 / fp16 holds beyond tensors; read off real
checkpoints with `torch.serialization.get_unsafe_globals_in_checkpoint`): the loss scalers (attributes
only), the ZeRO stage enum and the `fragment_address` dataclass (two ints).
"""
from __future__ import annotations

import pickle

import torch


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects outside the allow-list: refused, nothing of it was run."""


def deepspeed_safe_globals() -> list:
    """The non-tensor types of DeepSpeed checkpoints (imported lazily: clap_core needs no DeepSpeed to import)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location=None):
    """torch.load with weights_only=True and the DeepSpeed allow-list; refuses anything else."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).split("WeightsUnpickler error:", 1)[-1].strip().split(" was not", 1)[0]
        raise UntrustedCheckpointError(
            f"refused to load {path}: it holds a pickled object outside the allow-list of a DeepSpeed "
            f"checkpoint ({first}). Checkpoints are loaded without running code; if this file was written by "
            "something else than `clap pretrain`, do not use this run folder.") from None


def safe_checkpoint_engine():
    """A DeepSpeed TorchCheckpointEngine whose `load` is `load_weights_only` (saving is unchanged)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    return WeightsOnlyCheckpointEngine()


def load_deepspeed_checkpoint(engine, folder: str, tag: str):
    """engine.load_checkpoint(folder, tag) with every file read by `load_weights_only`."""
    saved = engine.checkpoint_engine
    engine.checkpoint_engine = safe_checkpoint_engine()
    try:
        path, _ = engine.load_checkpoint(folder, tag=tag)
    finally:
        engine.checkpoint_engine = saved
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {tag!r} in {folder}")
    return path
