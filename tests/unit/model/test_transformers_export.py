"""`clap export --format transformers`: transformers' ClapModel, ClapProcessor and pipeline load the folder
offline and agree with our model on decoded audio; importing it back gives our model again."""
import numpy as np
import pytest
import torch
from transformers import ClapModel as HFClapModel
from transformers import ClapProcessor, pipeline

from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.model.inference import pad_batch
from clap_core.model.laion import export_transformers
from tests.fixtures.audio import decoded_clips
from tests.fixtures.models import tiny_htsat_roberta

CAPTIONS = ["a dog barks in the rain", "glass breaking", "a low voice speaking"]


@pytest.fixture(scope="module", params=[False, True], ids=["unfused", "fused"])
def exported(request, tmp_path_factory):
    model = tiny_htsat_roberta(fusion=request.param)
    out = export_transformers(model, tmp_path_factory.mktemp("hf"))
    return model, out, request.param


@pytest.fixture(scope="module")
def clips():
    return decoded_clips([0.4, 1.0, 0.7])  # up to the 1 s window: the extractor is deterministic there


def test_transformers_loads_the_export_and_gives_our_embeddings(exported, clips):
    model, out, fused = exported
    hf, processor = HFClapModel.from_pretrained(out).eval(), ClapProcessor.from_pretrained(out)
    inputs = processor(audio=clips, text=CAPTIONS, sampling_rate=48_000, return_tensors="pt", padding=True)
    with torch.no_grad():
        mel, is_longer = model.frontend(*pad_batch(clips))
        # transformers' own feature extractor reproduces our log-mel (float64 numpy vs our float32 torch):
        # they differ by up to 0.2 dB only in bins ~90 dB under the peak (above the codec's lowpass).
        diff = (inputs["input_features"].float() - mel).abs()
        assert inputs["input_features"].shape == mel.shape
        assert diff.max() < 0.5 and diff.mean() < 0.01
        # Fused: for a batch of short clips transformers marks one clip "longer" at random (LAION's quirk),
        # so the flag comes from our front end; unfused models ignore it.
        hf_audio = hf.get_audio_features(input_features=inputs["input_features"],
                                         is_longer=is_longer if fused else inputs["is_longer"]).pooler_output
        hf_text = hf.get_text_features(input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"]).pooler_output
    assert np.abs(hf_audio.numpy() - model.embed_audio(clips, sample_rate=48_000, precision="fp32")).max() < 1e-4
    assert np.abs(hf_text.numpy() - model.embed_text(CAPTIONS, precision="fp32")).max() < 1e-4
    assert torch.allclose(hf.logit_scale_a.exp(), model.logit_scales()[0])


def test_zero_shot_pipeline_runs_on_the_export_with_our_probabilities(exported, clips):
    model, out, fused = exported
    if fused:
        pytest.skip("the pipeline's fused features mark a random clip as longer (see above)")
    classify = pipeline("zero-shot-audio-classification", model=str(out))
    labels = ["dog", "glass", "voice"]
    result = classify(clips[0], candidate_labels=labels)
    got = {r["label"]: r["score"] for r in result}
    audio = model.embed_audio(clips[:1], sample_rate=48_000, precision="fp32")
    text = model.embed_text([f"This is a sound of {label}." for label in labels], precision="fp32")
    expected = torch.softmax(model.logit_scales()[0].detach() * torch.from_numpy(audio @ text.T), dim=-1)[0]
    assert np.allclose([got[label] for label in labels], expected.numpy(), atol=1e-4)


def test_importing_the_export_gives_our_model_back(exported, clips):
    model, out, _ = exported
    again = ClapModel.from_pretrained(out)
    assert again.config.audio == model.config.audio  # front end (incl. mel scale) read from preprocessor_config
    assert again.config.audio_encoder == model.config.audio_encoder
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert np.array_equal(again.embed_audio(clips, sample_rate=48_000), model.embed_audio(clips, sample_rate=48_000))
    assert np.array_equal(again.embed_text(CAPTIONS), model.embed_text(CAPTIONS))


def test_export_refuses_what_transformers_cannot_represent(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="audio encoder 'conv'.*text backbone"):
        export_transformers(ClapModel(get_model_config("tiny")), tmp_path / "tiny")
    with pytest.raises(ValueError, match="unfused model with a htk mel front end.*slaney"):
        export_transformers(tiny_htsat_roberta(fusion=False, mel_scale="htk"), tmp_path / "htk")
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "htk").exists()


def test_clap_export_cli_writes_a_folder_transformers_loads_and_refuses_cleanly(tmp_path, capsys):
    from pipelines.cli import main

    tiny_htsat_roberta().save_pretrained(tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "transformers",
                 "--output", str(tmp_path / "hf")]) == 0
    assert HFClapModel.from_pretrained(tmp_path / "hf").config.projection_dim == 24
    # an occupied folder is never written into; an unrepresentable model is refused with the reason
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "transformers",
                 "--output", str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(tmp_path / "tiny")
    assert main(["export", "--checkpoint", str(tmp_path / "tiny"), "--format", "transformers",
                 "--output", str(tmp_path / "out")]) == 2
    assert "audio encoder 'conv'" in capsys.readouterr().err and not (tmp_path / "out").exists()
