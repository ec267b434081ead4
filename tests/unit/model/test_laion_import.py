"""LAION-CLAP import: our embeddings equal transformers' get_audio_features / get_text_features."""
import numpy as np
import pytest
import torch
from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapTextConfig
from transformers import ClapModel as HFClapModel

from clap_core.model.clap import ClapModel
from clap_core.model.encoders.text import byte_level_tokenizer


def tiny_hf_clap(fusion: bool) -> HFClapModel:
    torch.manual_seed(0)
    audio = ClapAudioConfig(spec_size=64, num_mel_bins=64, patch_size=4, patch_stride=[4, 4],
                            patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                            window_size=4, hidden_size=32, projection_dim=24, enable_fusion=fusion,
                            fusion_type="aff_2d" if fusion else None)
    text = ClapTextConfig(vocab_size=262, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=48, max_position_embeddings=80, projection_dim=24,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = HFClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=24))
    with torch.no_grad():  # non-trivial temperature and BN statistics, so a wrong mapping shows
        model.logit_scale_a.fill_(2.5)
        model.audio_model.audio_encoder.batch_norm.running_mean.uniform_(-1, 1)
        model.audio_model.audio_encoder.batch_norm.running_var.uniform_(0.5, 2)
    return model.eval()


WINDOW = 63 * 480  # samples of the tiny HTS-AT's 64-frame input (0.63 s at 48 kHz)


def tiny_feature_extractor(fusion: bool) -> ClapFeatureExtractor:
    """As LAION ships them: fusion -> HTK filters; rand_trunc (unfused) -> Slaney filters. Non-default f_min."""
    return ClapFeatureExtractor(feature_size=64, max_length_s=WINDOW / 48_000, frequency_min=0 if not fusion else 50,
                                frequency_max=14_000, truncation="fusion" if fusion else "rand_trunc",
                                padding="repeatpad")


@pytest.fixture(params=[False, True], ids=["unfused", "fused"])
def laion_folder(request, tmp_path):
    hf = tiny_hf_clap(request.param)
    hf.save_pretrained(tmp_path)
    byte_level_tokenizer(77).save_pretrained(tmp_path)
    tiny_feature_extractor(request.param).save_pretrained(tmp_path)
    return tmp_path, hf, request.param


def test_laion_import_matches_transformers_from_the_waveform(laion_folder):
    """Waveform -> ClapFeatureExtractor -> get_audio_features equals our encode_audio on the same waveform."""
    path, hf, fused = laion_folder
    ours = ClapModel.from_pretrained(path)
    rng = np.random.default_rng(2)
    t = np.arange(WINDOW + 1000) / 48_000
    # a clip 2 frames over the window (its 3 fusion chunks are then fixed, not drawn) and a short one (padded)
    long = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    short = (0.2 * np.sin(2 * np.pi * 3000 * t[:20_000]) + 0.05 * rng.standard_normal(20_000)).astype(np.float32)
    clips = [long, short] if fused else [long[:WINDOW], short]  # rand_trunc would crop long clips at random
    extractor = ClapFeatureExtractor.from_pretrained(path)
    features = extractor(clips, sampling_rate=48_000, max_length=WINDOW, return_tensors="pt")
    waves = torch.zeros(2, len(clips[0]))
    waves[0], waves[1, :len(clips[1])] = torch.from_numpy(clips[0]), torch.from_numpy(clips[1])
    with torch.no_grad():
        ref = hf.get_audio_features(input_features=features["input_features"].float(),
                                    is_longer=features["is_longer"]).pooler_output
        got = ours.encode_audio(waves, lengths=torch.tensor([len(c) for c in clips]))
    assert ours.config.audio.mel_scale == ("htk" if fused else "slaney")
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_laion_import_matches_transformers(laion_folder):
    path, hf, fused = laion_folder
    ours = ClapModel.from_pretrained(path)  # detects the transformers folder and imports it
    assert ours.config.name == "htsat-tiny-roberta" and ours.config.embed_dim == 24
    assert ours.config.audio.fusion == fused

    torch.manual_seed(1)
    # a long clip (2 s against a 0.63 s window for spec 64 x 64 mels) exercises fusion; a short one padding
    waves = torch.randn(2, 48_000 * 2) * 0.1
    lengths = torch.tensor([48_000 * 2, 20_000])
    assert ours.frontend.frames == 64  # the window follows the tiny HTS-AT's input size (0.63 s)
    with torch.no_grad():
        mel, is_longer = ours.frontend(waves, lengths)
        assert mel.shape == (2, 4 if fused else 1, 64, 64)
        ref_audio = hf.get_audio_features(input_features=mel, is_longer=is_longer).pooler_output
        our_audio = ours.encode_mel(mel, is_longer)
        batch = ours.tokenize(["a dog barks in the rain", "glass breaking"])
        ref_text = hf.get_text_features(**batch).pooler_output
        our_text = ours.encode_text(**batch)
        our_audio_from_wave = ours.encode_audio(waves, lengths=lengths)
    assert torch.allclose(our_audio, ref_audio, atol=1e-5)
    assert torch.allclose(our_text, ref_text, atol=1e-5)
    assert torch.equal(our_audio_from_wave, our_audio)
    assert torch.allclose(ours.logit_scales()[0], hf.logit_scale_a.exp())
    assert bool(is_longer[0]) and not bool(is_longer[1])


def test_imported_model_round_trips_through_save_pretrained(laion_folder, tmp_path_factory):
    path, _, _ = laion_folder
    ours = ClapModel.from_pretrained(path)
    out = tmp_path_factory.mktemp("ours")
    ours.save_pretrained(out)
    again = ClapModel.from_pretrained(out)
    batch = ours.tokenize(["footsteps on gravel"])
    with torch.no_grad():
        assert torch.equal(again.encode_text(**batch), ours.encode_text(**batch))
        mel = torch.randn(1, ours.frontend(torch.zeros(1, 100))[0].shape[1], 64, 64)
        assert torch.equal(again.encode_mel(mel), ours.encode_mel(mel))


def test_the_audio_side_of_a_laion_folder_alone(laion_folder):
    path, _, _ = laion_folder
    whole, audio = ClapModel.from_pretrained(path), ClapModel.from_pretrained(path, text_tower=False)
    assert not audio.has_text_tower and not any(k.startswith("text_") for k in audio.state_dict())
    mel = torch.randn(1, whole.frontend(torch.zeros(1, 100))[0].shape[1], 64, 64)
    with torch.no_grad():
        assert torch.equal(audio.encode_mel(mel), whole.encode_mel(mel))
