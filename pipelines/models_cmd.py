"""`clap models [NAME] [key=value ...]`: list the registered architectures, or show one resolved."""
from __future__ import annotations

import argparse

import yaml

from clap_core.config import to_dict
from clap_core.model.config import describe_model, get_model_config, list_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="a registered model name or a model YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")


def run(args: argparse.Namespace) -> int:
    if args.name is None:
        for name in list_models():
            cfg = get_model_config(name)
            print(f"{name:26s} audio={cfg.audio_encoder.type:9s} embed_dim={cfg.embed_dim:<5d} {describe_model(name)}")
        return 0
    print(yaml.safe_dump(to_dict(get_model_config(args.name, args.overrides)), sort_keys=False), end="")
    return 0
