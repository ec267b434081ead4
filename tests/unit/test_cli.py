"""The `clap` console script: subcommands, help, config errors named without a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import SUBCOMMANDS, available_subcommands, main

REPO = Path(__file__).resolve().parents[2]


def test_every_subcommand_is_installed_and_has_help(capsys):
    assert set(available_subcommands()) == set(SUBCOMMANDS)
    for name in SUBCOMMANDS:
        try:
            main([name, "--help"])
        except SystemExit as e:
            assert e.code == 0
        assert f"usage: clap {name}" in capsys.readouterr().out


def test_models_lists_and_resolves_with_overrides(capsys):
    assert main(["models"]) == 0
    assert "htsat-tiny-roberta" in capsys.readouterr().out
    assert main(["models", "tiny", "embed_dim=32"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["embed_dim"] == 32


def test_unknown_config_key_exits_2_naming_the_key():
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "models", "tiny", "audio.nmels=3"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown config key 'audio.nmels' (did you mean 'audio.n_mels'?)" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["clara-perceiver", "cnn14-bert", "htsat-tiny-roberta"])
def test_offline_switch_builds_named_models_without_the_hub(name, monkeypatch, capsys):
    import yaml

    from clap_core.model import ClapModel
    from clap_core.model_config import OFFLINE_ENV, get_model_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    assert get_model_config(name).text_encoder.pretrained is not None  # online: hub weights
    assert main(["models", name, "--offline"]) == 0  # the flag in any position
    shown = yaml.safe_load(capsys.readouterr().out)["text_encoder"]
    assert shown["pretrained"] is None and shown["tokenizer"] == "bytes" and shown["hf_config"]["vocab_size"] == 260
    model = ClapModel(get_model_config(name))  # now offline by env (set by the flag)
    assert model.text_encoder.backbone.get_input_embeddings().weight.shape[0] == len(model.tokenizer) == 260
