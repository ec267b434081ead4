"""Registry of the shipped job configs: `pipelines/configs/<stem>.yaml` -> its typed dataclass.

Used by the CLI's --config default and by the test that loads every shipped YAML.
"""
from __future__ import annotations

import importlib
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"

_CLASSES = {
    "pretrain": "clap_core.train.config:PretrainConfig",
    "tune_probe": "clap_core.eval.probe_config:ProbeSweepConfig",
    "preprocess": "clap_core.preprocess.config:PreprocessConfig",
}


class _LazyRegistry(dict):
    """Imports a config class only when asked, so listing jobs does not import torch or ray."""

    def __missing__(self, stem: str):
        if stem not in _CLASSES:
            raise KeyError(f"no config class registered for pipelines/configs/{stem}.yaml")
        module, name = _CLASSES[stem].split(":")
        return getattr(importlib.import_module(module), name)


JOB_CONFIGS = _LazyRegistry()


def default_config_path(stem: str) -> Path:
    return CONFIG_DIR / f"{stem}.yaml"
