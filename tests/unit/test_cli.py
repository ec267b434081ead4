"""The `clap` console script: subcommands, help, config errors named without a traceback."""
import subprocess
import sys
from pathlib import Path

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
