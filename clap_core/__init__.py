"""clap_core: the CLAP library (model, loss, audio, data, eval). It never imports Ray.

    from clap_core import ClapModel, get_model_config
    model = ClapModel.from_pretrained("runs/demo/final")
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

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
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clap_core' has no attribute '{name}'")
    value = importlib.import_module(_EXPORTS[name])
    for part in _ATTRIBUTES.get(name, name).split("."):
        value = getattr(value, part)
    return value
