"""Broken checkpoint folders: one clear line naming the path and the problem, exit code 2, never a hub id."""
from __future__ import annotations

import shutil

import pytest
import torch

from clap_core.config import CheckpointError
from clap_core.model.clap import ClapModel, check_checkpoint
from clap_core.model.config import get_model_config
from pipelines.cli import main


class ChecksPassed(Exception):
    """Raised where `clap embed`'s driver would start Ray or embed in process: every check before it passed."""


@pytest.fixture
def embed_driver(tmp_path, monkeypatch):
    """(pipelines.embed with Ray's start and the in-process runner replaced by ChecksPassed, a one-row manifest):
    runs the driver's checks of a checkpoint, which come before either runner starts, and nothing after them."""
    import json

    import pipelines.embed as embed_job

    def stop(*args, **kwargs):
        raise ChecksPassed

    monkeypatch.setattr(embed_job, "init_ray", stop)
    monkeypatch.setattr(embed_job, "embed_in_process", stop)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio_path": "a.wav", "caption": "x"}) + "\n")
    return embed_job, manifest


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
    elif how in ("one_byte_short", "trailing_bytes", "header_claims_too_much", "header_not_json"):
        data = (path / "model.safetensors").read_bytes()
        length = int.from_bytes(data[:8], "little")
        data = {"one_byte_short": data[:-1], "trailing_bytes": data + b"\0",
                # a header length of 2**62: read as far as the file goes, never allocated
                "header_claims_too_much": (2**62).to_bytes(8, "little") + data[8:],
                "header_not_json": data[:8] + b"\xff" * length + data[8 + length:]}[how]
        (path / "model.safetensors").write_bytes(data)
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
         # the check's own account of the damage, after the one-line prefix every weights problem shares
         "one_byte_short": ("model.safetensors", "the file holds"),
         "trailing_bytes": ("model.safetensors", "the file holds"),
         "header_claims_too_much": ("model.safetensors", f"its header claims {2**62} bytes"),
         "header_not_json": ("model.safetensors", "can't decode byte 0xff"),
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


def test_folder_checks_and_the_embed_job_module_import_neither_torch_nor_transformers(saved):
    """A job's driver checks its checkpoint and its decode workers import pipelines.embed: neither loads a model,
    and importing torch + transformers costs ~5 s on 2 cores."""
    import subprocess
    import sys

    code = ("import sys; import pipelines.embed; from clap_core.model.folders import check_checkpoint; "
            f"check_checkpoint({str(saved)!r}); "
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_transformers_clap_folder_is_checked_as_one_and_clap_embed_takes_it(saved, tmp_path, embed_driver):
    """Released LAION-CLAP weights come as transformers folders (config.json, no config.yaml), which
    from_pretrained imports: `clap embed`'s driver checks them as such instead of refusing them."""
    import json

    from safetensors.torch import save_file

    from clap_core.model.folders import check_transformers_folder, is_transformers_folder

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clap"}))
    save_file({"w": torch.zeros(3)}, str(folder / "model.safetensors"))
    assert is_transformers_folder(folder) and not is_transformers_folder(saved)
    check_transformers_folder(folder)
    embed_job, manifest = embed_driver
    with pytest.raises(ChecksPassed):
        embed_job.embed_dataset(str(folder), str(manifest), str(tmp_path / "out"))

    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'bert', not a transformers CLAP model"):
        embed_job.embed_dataset(str(folder), str(manifest), str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()  # refused before anything was written
    (folder / "config.json").write_text(json.dumps({"model_type": "clap"}))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable, truncated .*the file holds"):
        check_transformers_folder(folder)


def test_an_s3_checkpoint_is_checked_in_the_driver_and_named_by_its_uri(saved, tmp_path, s3_bucket, embed_driver):
    """The driver downloads an s3:// checkpoint once (storage.local_copy) and checks that copy, as it checks a
    local folder: a broken one fails in one line naming its URI (not the cache), before Ray or any actor starts."""
    import boto3

    s3 = boto3.client("s3")
    for name, folder in (("good", saved), ("bad", broken(saved, tmp_path, "truncated_weights"))):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            s3.upload_file(str(path), s3_bucket, f"{name}/{path.relative_to(folder).as_posix()}")
    embed_job, manifest = embed_driver
    with pytest.raises(ChecksPassed):
        embed_job.embed_dataset(f"s3://{s3_bucket}/good", str(manifest), str(tmp_path / "out"))
    with pytest.raises(CheckpointError) as refused:
        embed_job.embed_dataset(f"s3://{s3_bucket}/bad", str(manifest), str(tmp_path / "out2"))
    assert str(refused.value).startswith(f"s3://{s3_bucket}/bad/model.safetensors: unreadable, truncated")
    assert "clap-cache" not in str(refused.value)
    assert not (tmp_path / "out2").exists()  # refused before anything was written
