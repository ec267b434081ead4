"""The `clap` console script: subcommands, help, config errors named without a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import SUBCOMMANDS, available_subcommands, main

REPO = Path(__file__).resolve().parents[3]


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

    from clap_core.model.clap import ClapModel
    from clap_core.model.config import OFFLINE_ENV, get_model_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    assert get_model_config(name).text_encoder.pretrained is not None  # online: hub weights
    assert main(["models", name, "--offline"]) == 0  # the flag in any position
    shown = yaml.safe_load(capsys.readouterr().out)["text_encoder"]
    assert shown["pretrained"] is None and shown["tokenizer"] == "bytes" and shown["hf_config"]["vocab_size"] == 260
    model = ClapModel(get_model_config(name))  # now offline by env (set by the flag)
    assert model.text_encoder.backbone.get_input_embeddings().weight.shape[0] == len(model.tokenizer) == 260


def test_overrides_work_in_any_position_relative_to_the_flags(monkeypatch):
    from pipelines import cli

    seen = {}
    monkeypatch.setattr("pipelines.pretrain.run", lambda args: seen.update(vars(args)) or 0)
    argv = ["pretrain", "train.steps=3", "--data", "d", "scaling.num_workers=1", "--output", "o", "train.lr=0.1"]
    assert cli.main(argv) == 0
    assert seen["overrides"] == ["train.steps=3", "scaling.num_workers=1", "train.lr=0.1"]
    assert (seen["data"], seen["output"], seen["command"]) == ("d", "o", "pretrain")


def test_worker_console_lines_are_written_once(capfd):
    """Ray Train patches print() in workers to log and echo: step lines use one plain stdout write."""
    import builtins

    from clap_core.train.run_log import RunLogger, console_line

    echoed = []
    original = builtins.print
    builtins.print = lambda *a, **k: (echoed.append(a), original(*a, **k))  # what the patch does, twice
    try:
        logger = RunLogger.__new__(RunLogger)
        logger.enabled, logger.history, logger.emit = True, [], console_line  # RunLogger's default emit
        logger.interval({"step": 1, "loss": 1.0, "temperature": 0.07, "lr": 1e-3, "samples_per_s": 2.0,
                         "data_wait_share": 0.1}, 3)
    finally:
        builtins.print = original
    assert echoed == [] and capfd.readouterr().out.count("step 1/3") == 1


def test_server_logs_go_to_the_log_file_unless_verbose(tmp_path, monkeypatch, capsys):
    import logging

    from pipelines.console import LOG_FORMAT, VERBOSE_ENV, route_loggers

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    logger = logging.getLogger("werkzeug")
    # route_loggers also rewires Ray's loggers that exist in this process: restore every logger afterwards
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)] + [logger]
    saved = {lg: (list(lg.handlers), lg.propagate, lg.level) for lg in loggers}
    handler = logging.FileHandler(tmp_path / "demo.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    try:
        route_loggers(handler, ("werkzeug",))
        logger.info('127.0.0.1 - - "HEAD /bucket/key HTTP/1.1" 200 -')
        handler.flush()
        assert "HEAD /bucket/key" in (tmp_path / "demo.log").read_text()
        assert not logger.propagate and "HEAD" not in capsys.readouterr().err
    finally:
        handler.close()
        for lg, (handlers, propagate, level) in saved.items():
            lg.handlers[:], lg.propagate, lg.level = handlers, propagate, level
