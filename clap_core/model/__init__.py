"""The model wing: registry configs, front end, encoders, ClapModel, LAION/transformers/ONNX exchange."""
from __future__ import annotations


def __getattr__(name: str):
    if name == "ClapModel":  # the 0.1 module clap_core.model held the class: name where it is now
        raise ImportError("ClapModel moved to clap_core.model.clap (or use `from clap_core import ClapModel`)")
    raise AttributeError(f"module 'clap_core.model' has no attribute '{name}'")
