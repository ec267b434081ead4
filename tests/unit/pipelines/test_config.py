"""Typed configs: YAML + dotted overrides, unknown keys and wrong types named; every shipped YAML loads."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from clap_core.config import ConfigError, apply_overrides, config_hash, load_config, parse_override
from clap_core.model.config import ClapModelConfig, HTSATConfig, get_model_config, list_models

REPO = Path(__file__).resolve().parents[3]


@dataclass
class Inner:
    lr: float = 1e-3  # a float
    steps: int = 10  # an int
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    sizes: tuple[int, ...] = (1, 2)
    path: str | None = None


def test_overrides_are_parsed_as_yaml_values():
    assert parse_override("inner.lr=3e-4") == (["inner", "lr"], "3e-4")
    assert parse_override("sizes=[4, 5]") == (["sizes"], [4, 5])
    assert parse_override("path=null") == (["path"], None)
    cfg = load_config(Outer, {"name": "y"}, ["inner.lr=3e-4", "inner.steps=7", "sizes=[4,5]", "inner.mode=b"])
    assert cfg == Outer(name="y", inner=Inner(lr=3e-4, steps=7, mode="b"), sizes=(4, 5))


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.stpes' \(did you mean 'inner\.steps'\?\)"):
        load_config(Outer, {}, ["inner.stpes=3"])
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(Outer, {"bogus": 1})


@pytest.mark.parametrize("override, key", [("inner.steps=ten", "inner.steps"), ("inner.lr=fast", "inner.lr"),
                                            ("inner.mode=c", "inner.mode"), ("sizes=[1, x]", r"sizes\[1\]"),
                                            ("inner.steps=true", "inner.steps"), ("inner=3", "inner")])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(Outer, {}, [override])


def test_override_needs_key_value_form():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["justakey"])


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"inner": {"lr": 0.5}}))
    assert load_config(Outer, path, ["inner.steps=3"]).inner == Inner(lr=0.5, steps=3)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(Outer()) == config_hash(Outer())
    assert config_hash(Outer()) != config_hash(Outer(name="z"))


def test_model_registry_variants_pick_the_encoder_dataclass():
    cfg = get_model_config("htsat-tiny-roberta", ["audio_encoder.depths=[1,1]"])
    assert isinstance(cfg.audio_encoder, HTSATConfig) and cfg.audio_encoder.depths == (1, 1)
    with pytest.raises(ConfigError, match="'audio_encoder.num_latents'"):
        get_model_config("htsat-tiny-roberta", ["audio_encoder.num_latents=8"])  # a Perceiver key
    with pytest.raises(ConfigError, match="'audio_encoder.type' must be one of"):
        get_model_config("tiny", ["audio_encoder.type=resnet"])
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        get_model_config("nope")


def test_required_registry_models_exist():
    assert {"htsat-tiny-roberta", "cnn14-bert", "clara-perceiver", "tiny"} <= set(list_models())
    clara = get_model_config("clara-perceiver")
    assert clara.temperature.per_modality and clara.text_encoder.pooling == "mean_max"
    assert get_model_config("cnn14-bert").embed_dim == 1024
    assert get_model_config("htsat-tiny-roberta").embed_dim == 512


def shipped_yaml_files():
    return sorted(p for d in ("clap_core", "pipelines") for p in (REPO / d).rglob("*.yaml"))


def config_class_for(path: Path):
    """Every shipped YAML has a config class: model configs by folder, job configs by their file name."""
    if path.parent.name == "models":
        return ClapModelConfig
    from pipelines.job_configs import JOB_CONFIGS
    return JOB_CONFIGS[path.stem]


@pytest.mark.parametrize("path", shipped_yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_loads_and_validates(path):
    cfg = load_config(config_class_for(path), path)
    assert cfg is not None
