"""clap_core: the CLAP library, in wings: audio/, data/, preprocess/, model/, train/, eval/ (README: "Where
things live"). It never imports Ray.

    from clap_core import ClapModel, get_model_config
    model = ClapModel.from_pretrained("runs/demo/final")
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.2.0"

# Attributes load on first use, so `import clap_core` stays cheap for config-only callers.
_EXPORTS = {
    "ClapModel": "clap_core.model.clap",
    "ClapModelConfig": "clap_core.model.config",
    "get_model_config": "clap_core.model.config",
    "list_models": "clap_core.model.config",
    "load_config": "clap_core.config",
    "ConfigError": "clap_core.config",
    "import_laion_clap": "clap_core.model.clap",  # ClapModel.from_laion under its historical name
}
_ATTRIBUTES = {"import_laion_clap": "ClapModel.from_laion"}  # where an export is not a module-level name

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in MOVED_MODULES:
        raise ImportError(moved_message(f"clap_core.{name}"))
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clap_core' has no attribute '{name}'")
    value = importlib.import_module(_EXPORTS[name])
    for part in _ATTRIBUTES.get(name, name).split("."):
        value = getattr(value, part)
    return value


# Modules of the flat 0.1 layout -> where they live now. Importing an old name fails with an error naming the
# new module (no silent alias: one name per concept).
MOVED_MODULES = {
    "audio_io": "clap_core.audio.codec", "augment": "clap_core.audio.augment",
    "manifest": "clap_core.data.inputs", "meld": "clap_core.data.meld", "rejects": "clap_core.data.rejects",
    "shards": "clap_core.data.shards", "embeddings": "clap_core.data.embeddings",
    "preprocess_config": "clap_core.preprocess.config", "plan": "clap_core.preprocess.plan",
    "model_config": "clap_core.model.config", "features": "clap_core.model.frontend",
    "encoders": "clap_core.model.encoders", "laion": "clap_core.model.laion",
    "onnx_export": "clap_core.model.onnx_export", "inference": "clap_core.model.inference",
    "loss": "clap_core.train.loss", "metrics": "clap_core.eval.metrics", "evaluation": "clap_core.eval.evaluation",
    "probe": "clap_core.eval.probe", "plots": "clap_core.eval.plots", "sources": "clap_core.eval.sources",
    "synth": "clap_demo.synth", "synth_meld": "clap_demo.synth_meld",
}


def moved_message(fullname: str) -> str:
    new = MOVED_MODULES[fullname.split(".", 1)[1]]
    return f"{fullname} moved to {new} (clap_core is grouped into wings since 0.2; see README: Where things live)"


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Turns `import clap_core.<old flat module>` into an ImportError that names the new module."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package == "clap_core" and name in MOVED_MODULES:
            raise ModuleNotFoundError(moved_message(fullname), name=fullname)
        return None


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
