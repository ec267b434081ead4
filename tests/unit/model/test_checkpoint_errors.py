"""Broken checkpoint folders: one clear line naming the path and the problem, exit code 2, never a hub id."""
from __future__ import annotations

import shutil

import pytest
import torch

from clap_core.config import CheckpointError
from clap_core.model.clap import ClapModel, check_checkpoint
from clap_core.model.config import get_model_config
from pipelines.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "good"
    ClapModel(get_model_config("tiny")).save_pretrained(path)
    return path


def broken(saved, tmp_path, how: str):
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    if how == "no_tokenizer":
        shutil.rmtree(path / "tokenizer")
    elif how == "truncated_weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "header_only_weights":
        (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:6])
    elif how == "no_weights":
        (path / "model.safetensors").unlink()
    elif how == "bad_config":
        (path / "config.yaml").write_text("audio_encoder: [unclosed\n")
    elif how == "no_config":
        (path / "config.yaml").unlink()
    elif how == "missing_folder":
        shutil.rmtree(path)
    return path


CASES = {"no_tokenizer": ("tokenizer", "missing"), "truncated_weights": ("model.safetensors", "truncated"),
         "header_only_weights": ("model.safetensors", "truncated"), "no_weights": ("model.safetensors", "missing"),
         "bad_config": ("config.yaml", "not a valid model config"), "no_config": ("", "holds no config.yaml"),
         "missing_folder": ("", "no such checkpoint folder")}


@pytest.mark.parametrize("how", sorted(CASES))
def test_broken_checkpoint_names_path_and_problem(saved, tmp_path, how):
    path = broken(saved, tmp_path, how)
    suffix, problem = CASES[how]
    with pytest.raises(CheckpointError) as info:
        ClapModel.from_pretrained(path)
    message = str(info.value)
    assert "\n" not in message and problem in message
    assert message.startswith(str(path / suffix) if suffix else str(path))
    assert "Repo id" not in message and "header too large" not in message.split("(")[0]


def test_cli_prints_one_line_and_exits_2(saved, tmp_path, capsys):
    path = broken(saved, tmp_path, "no_tokenizer")
    (tmp_path / "m.jsonl").write_text("")
    code = main(["evaluate", "--checkpoint", str(path), "--data", str(tmp_path / "m.jsonl"), "--task", "retrieval",
                 "--output", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"clap evaluate: checkpoint error: {path / 'tokenizer'}: missing " \
                                        "(save_pretrained writes the tokenizer there)"
    assert "Traceback" not in err


def test_good_checkpoint_passes_the_check(saved):
    assert check_checkpoint(saved).audio.sample_rate == 48000
