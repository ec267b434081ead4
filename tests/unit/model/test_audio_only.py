"""from_pretrained(..., text_tower=False): the audio side of a checkpoint alone, for audio-only jobs (clap embed
--no-text). Its audio embeddings equal the whole model's; it holds and reads no text weights; text methods,
saving and exports refuse it in one clear line."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from clap_core.config import CheckpointError
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from tests.fixtures.audio import decoded_clips


def is_text(name: str) -> bool:
    return name.startswith(("text_encoder.", "text_projection."))


@pytest.mark.parametrize("name", ["tiny", "tiny-whisper"])
def test_the_audio_side_alone_embeds_as_the_whole_model(name, tmp_path):
    torch.manual_seed(0)
    whole = ClapModel(get_model_config(name)).eval()
    whole.save_pretrained(tmp_path / "ckpt")
    audio = ClapModel.from_pretrained(tmp_path / "ckpt", text_tower=False)
    assert not audio.has_text_tower and whole.has_text_tower and audio.tokenizer is None
    held = set(audio.state_dict())
    assert held == {k for k in whole.state_dict() if not is_text(k)} and not any(map(is_text, held))
    clips = decoded_clips([2.0, 3.0])
    for precision in ("fp32", "bf16"):  # the bf16 copy of an audio-only model: its audio tower and projection
        assert np.array_equal(audio.embed_audio(clips, sample_rate=48_000, precision=precision),
                              whole.embed_audio(clips, sample_rate=48_000, precision=precision)), precision
    for call in (lambda: audio.embed_text(["a dog barking"]), lambda: audio.tokenize(["a dog"]),
                 lambda: audio.zero_shot(clips, ["dog", "cat"], sample_rate=48_000),
                 lambda: audio.save_pretrained(tmp_path / "again")):
        with pytest.raises(ValueError, match=r"text_tower=False"):
            call()
    assert not (tmp_path / "again").exists()  # refused before anything is written


def test_the_audio_side_reads_only_its_tensors_and_names_what_is_missing(tmp_path):
    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(weights)
    # Text tensors of the wrong shape: the audio side never reads them, the whole model refuses them.
    save_file({k: (torch.zeros(3) if is_text(k) else v) for k, v in tensors.items()}, weights)
    audio = ClapModel.from_pretrained(tmp_path / "ckpt", text_tower=False)
    assert torch.equal(audio.state_dict()["audio_projection.linear2.weight"], tensors["audio_projection.linear2.weight"])
    with pytest.raises(CheckpointError, match="do not match"):
        ClapModel.from_pretrained(tmp_path / "ckpt")
    # An audio tensor missing or of the wrong shape: named, as for the whole model.
    lacking = {k: v for k, v in tensors.items() if k != "audio_projection.linear2.weight"}
    save_file(lacking, weights)
    with pytest.raises(CheckpointError, match=r"do not match config.yaml.*audio_projection.linear2.weight"):
        ClapModel.from_pretrained(tmp_path / "ckpt", text_tower=False)
    save_file({**lacking, "audio_projection.linear2.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(CheckpointError, match=r"do not match config.yaml.*audio_projection.linear2.weight"):
        ClapModel.from_pretrained(tmp_path / "ckpt", text_tower=False)


def test_exports_refuse_a_model_without_its_text_tower(tmp_path):
    from clap_core.model.laion import export_transformers
    from clap_core.model.onnx_export import export_onnx

    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(tmp_path / "ckpt")
    audio = ClapModel.from_pretrained(tmp_path / "ckpt", text_tower=False)
    for export in (export_onnx, export_transformers):
        with pytest.raises(ValueError, match=r"needs the text tower"):
            export(audio, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_the_towers_keep_their_build_order_with_or_without_the_text_side():
    """Optimizer state and ZeRO's flat buffers in saved runs follow the parameters' order, and a seed's weights
    follow the build order: both stay audio tower, text tower, audio projection, text projection, temperature."""
    def towers(model: ClapModel) -> list[str]:
        names = [name.split(".")[0] for name, _ in model.named_parameters()]
        return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]

    torch.manual_seed(0)
    whole = ClapModel(get_model_config("tiny"))
    assert towers(whole) == ["audio_encoder", "text_encoder", "audio_projection", "text_projection", "logit_scale"]
    torch.manual_seed(0)
    audio = ClapModel(get_model_config("tiny"), text_tower=False)
    assert towers(audio) == ["audio_encoder", "audio_projection", "logit_scale"]
    assert torch.equal(audio.audio_encoder.state_dict()[next(iter(audio.audio_encoder.state_dict()))],
                       whole.audio_encoder.state_dict()[next(iter(whole.audio_encoder.state_dict()))])
