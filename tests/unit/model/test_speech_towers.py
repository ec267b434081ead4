"""Speech towers (wav2vec 2.0, Whisper): equal to transformers' own models and feature extractors on the same
16 kHz audio, padding masked, options that do what they say, checkpoints that round-trip."""

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from clap_core.model.clap import ClapModel
from clap_core.model.config import describe_model, get_model_config, list_models
from clap_core.model.encoders.speech import LayerMix, MaskedPooling, Resampler
from clap_core.model.encoders.wav2vec2 import Wav2Vec2Encoder
from clap_core.model.encoders.whisper import WhisperAudioEncoder

W2V = dict(model_type="wav2vec2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           conv_dim=[16, 16, 16], conv_stride=[5, 4, 4], conv_kernel=[10, 8, 8], num_conv_pos_embeddings=16,
           num_conv_pos_embedding_groups=2, mask_time_prob=0.0)
W2V_LAYER_NORM = dict(W2V, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
WHISPER = dict(model_type="whisper", d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
               num_mel_bins=80, max_source_positions=50)  # 50 positions = 100 mel frames = a 1 s window
TOL = 1e-5


def speech_16k(lengths, seed=0):
    """Clips with speech-like structure (harmonics + noise), zero-padded into one (B, N) batch at 16 kHz."""
    rng = np.random.default_rng(seed)
    clips = []
    for n in lengths:
        t = np.arange(n) / 16_000
        f0 = rng.uniform(100, 250)
        clip = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * 0.1 + rng.normal(0, 0.01, n)
        clips.append(clip.astype(np.float32))
    batch = torch.zeros(len(lengths), max(lengths))
    for i, c in enumerate(clips):
        batch[i, :len(c)] = torch.from_numpy(c)
    return clips, batch, torch.tensor(lengths)


def twin(module_cls, config, state):
    """transformers' own model from the same config, with the same weights."""
    ref = module_cls(config).eval()
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("hf_config,masked", [(W2V, False), (W2V_LAYER_NORM, True)])
def test_wav2vec2_hidden_states_equal_transformers(hf_config, masked):
    """Reference input: each clip through Wav2Vec2FeatureExtractor, zero-padded to the batch (transformers'
    advice for group-norm checkpoints, whose batched extractor would normalise the padding in); the mask too
    for layer-norm ones, where the batched extractor gives the same."""
    torch.manual_seed(0)
    tower = Wav2Vec2Encoder(sample_rate=16_000, hf_config=hf_config, layers="weighted").eval()
    assert tower.do_normalize and tower.uses_attention_mask == masked
    clips, waves, lengths = speech_16k([16_000, 9_000])
    fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=masked)
    one_by_one = [fe(c, sampling_rate=16_000, return_tensors="np").input_values[0] for c in clips]
    values = torch.from_numpy(np.stack([np.pad(v, (0, 16_000 - len(v))) for v in one_by_one]))
    inputs = {"input_values": values}
    if masked:
        batched = fe(clips, sampling_rate=16_000, padding=True, return_tensors="pt")
        torch.testing.assert_close(batched.input_values, values, atol=TOL, rtol=0)
        inputs["attention_mask"] = batched.attention_mask
    ref = twin(Wav2Vec2Model, tower.backbone.config, tower.backbone.state_dict())
    with torch.no_grad():
        expected = ref(**inputs, output_hidden_states=True).hidden_states
        ours, mask = tower.hidden_states(waves, lengths)
    assert len(ours) == len(expected) == 3
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    frames = ref._get_feat_extract_output_lengths(lengths)
    assert mask.sum(1).tolist() == frames.tolist()


def test_whisper_logmel_equals_feature_extractor():
    tower = WhisperAudioEncoder(sample_rate=16_000, hf_config=WHISPER)
    clips, waves, lengths = speech_16k([16_000, 7_000])
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=1)  # pads every clip to 1 s
    expected = fe(clips, sampling_rate=16_000, return_tensors="pt").input_features  # (2, 80, 100)
    ours = tower.logmel(waves, lengths)
    assert ours.shape == expected.shape == (2, 80, 100)
    torch.testing.assert_close(ours, expected.float(), atol=TOL, rtol=0)


def test_whisper_hidden_states_equal_transformers():
    torch.manual_seed(0)
    tower = WhisperAudioEncoder(sample_rate=16_000, hf_config=WHISPER, layers="weighted").eval()
    clips, waves, lengths = speech_16k([16_000, 16_000], seed=3)
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    features = fe(clips, sampling_rate=16_000, return_tensors="pt").input_features
    ref = twin(WhisperEncoder, tower.encoder.config, tower.encoder.state_dict())
    with torch.no_grad():
        expected = ref(features, output_hidden_states=True).hidden_states
        ours, mask = tower.hidden_states(tower.logmel(waves, lengths))  # waveform -> log-mel -> states, in torch
    assert len(ours) == len(expected) == 3 and bool(mask.all())
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_whisper_short_window_uses_first_positions_and_rejects_longer_than_the_model():
    torch.manual_seed(0)
    tower = WhisperAudioEncoder(sample_rate=16_000, hf_config=WHISPER).eval()
    _, waves, lengths = speech_16k([8_000, 8_000])
    with torch.no_grad():
        states, _ = tower.hidden_states(tower.logmel(waves, lengths), all_layers=False)  # 50 frames -> 25
    assert states[-1].shape == (2, 25, 32)
    with pytest.raises(ValueError, match="exceed Whisper"):
        tower(torch.zeros(1, 16_400))  # 102 mel frames: over the 1 s of 50 positions


@pytest.mark.parametrize("name", ["tiny-wav2vec2", "tiny-whisper"])
def test_embedding_does_not_depend_on_batch_or_padding(name):
    """Padding is masked: a short clip embeds the same alone, beside a longer clip, or zero-padded."""
    torch.manual_seed(0)
    model = ClapModel(get_model_config(name)).eval()
    _, waves, lengths = speech_16k([60_000, 20_000])
    waves48 = torch.repeat_interleave(waves, 3, dim=1)  # any 48 kHz signal will do
    with torch.no_grad():
        together = model.encode_audio(waves48, lengths=lengths * 3)
        alone = model.encode_audio(waves48[1:2, :60_000])
        noisy_pad = waves48[1:2].clone()
        noisy_pad[:, 60_000:] = 1.0  # whatever lies past the length is not audio
        padded = model.encode_audio(noisy_pad, lengths=torch.tensor([60_000]))
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def test_resampler_48k_to_16k_keeps_a_tone_and_scales_lengths():
    t = torch.arange(48_000) / 48_000
    tone = torch.sin(2 * torch.pi * 1000 * t)[None]  # (1, 48000)
    out, lengths = Resampler(48_000, 16_000)(tone, torch.tensor([48_000]))
    assert out.shape == (1, 16_000) and lengths.tolist() == [16_000]
    spectrum = torch.fft.rfft(out[0, 1000:-1000]).abs()
    assert abs(int(spectrum.argmax()) * 16_000 / 14_000 - 1000) < 2  # peak bin stays at 1 kHz
    assert Resampler(48_000, 16_000)(tone, torch.tensor([100]))[1].tolist() == [34]  # ceil(100 / 3)
    assert not Resampler(48_000, 16_000).state_dict()  # nothing to save: the kernel follows from the rates


@pytest.mark.parametrize("mode", ["mean", "attention"])
def test_pooling_ignores_padding_frames(mode):
    torch.manual_seed(0)
    pool = MaskedPooling(8, mode)
    frames = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    changed = frames.clone()
    changed[1, 3:] = 100.0
    torch.testing.assert_close(pool(frames, mask), pool(changed, mask))
    if mode == "mean":
        torch.testing.assert_close(pool(frames, mask)[1], frames[1, :3].mean(0))


def test_weighted_layers_start_as_the_average_and_last_takes_the_last():
    states = [torch.full((1, 2, 3), float(i)) for i in range(4)]
    assert torch.equal(LayerMix(4, "last")(states), states[-1])
    torch.testing.assert_close(LayerMix(4, "weighted")(states), torch.full((1, 2, 3), 1.5))
    with pytest.raises(ValueError, match="layers must be"):
        LayerMix(4, "middle")


def test_freeze_feature_encoder_and_gradient_checkpointing():
    torch.manual_seed(0)
    frozen = Wav2Vec2Encoder(sample_rate=16_000, hf_config=W2V, freeze_feature_encoder=True)
    assert not any(p.requires_grad for p in frozen.backbone.feature_extractor.parameters())
    assert all(p.requires_grad for p in frozen.backbone.encoder.parameters())
    _, waves, lengths = speech_16k([16_000, 8_000])
    for cls, cfg in ((Wav2Vec2Encoder, W2V_LAYER_NORM), (WhisperAudioEncoder, WHISPER)):
        grads = []
        for ckpt in (False, True):
            torch.manual_seed(0)
            tower = cls(sample_rate=16_000, hf_config=cfg, gradient_checkpointing=ckpt).train()
            if cls is Wav2Vec2Encoder:
                assert tower.backbone.is_activation_checkpointing == ckpt
            tower(waves, lengths).square().sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in tower.parameters() if p.grad is not None]))
        torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_layerdrop_one_skips_every_layer_in_training_only():
    torch.manual_seed(0)
    tower = WhisperAudioEncoder(sample_rate=16_000, hf_config=WHISPER, layerdrop=1.0)
    _, waves, lengths = speech_16k([16_000])
    mel = tower.logmel(waves, lengths)
    states, _ = tower.train().hidden_states(mel)
    assert torch.equal(states[1], states[0])  # dropped layers pass their input on
    states, _ = tower.eval().hidden_states(mel)
    assert not torch.equal(states[1], states[0])
    w2v = Wav2Vec2Encoder(sample_rate=16_000, hf_config=W2V, layerdrop=1.0, layers="weighted").train()
    assert w2v.layerdrop == 1.0 and w2v.resolved_config()["layerdrop"] == 1.0
    assert w2v.backbone.config.layerdrop == 0.0  # transformers' per-rank draw is replaced by layer_drop_mask
    states, _ = w2v.hidden_states(waves, lengths)
    assert len(states) == 3 and torch.equal(states[1], states[0])  # skipped layers keep the weighted sum whole
    assert w2v(waves, lengths).shape == (1, 32)


@pytest.mark.parametrize("name", ["tiny-wav2vec2", "tiny-whisper"])
def test_save_pretrained_round_trip_is_self_contained(tmp_path, name):
    torch.manual_seed(0)
    model = ClapModel(get_model_config(name)).eval()
    model.save_pretrained(tmp_path)
    loaded = ClapModel.from_pretrained(tmp_path)
    enc = loaded.config.audio_encoder
    assert enc.pretrained is None and enc.hf_config["model_type"] == name.split("-")[1]
    _, waves, lengths = speech_16k([30_000, 12_000])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_audio(waves, lengths=lengths), model.encode_audio(waves, lengths=lengths))
    # from_pretrained skips random init: the buffers it does not read (mel filterbanks, positions) are built
    assert [n for n, _ in loaded.named_buffers()] == [n for n, _ in model.named_buffers()]
    for (name, built), (_, original) in zip(loaded.named_buffers(), model.named_buffers()):
        assert torch.equal(built, original), name


def test_pretrained_wav2vec2_folder_sets_the_front_end_from_its_feature_extractor(tmp_path):
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Encoder(hf_config=W2V).backbone.config).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(do_normalize=False, return_attention_mask=True).save_pretrained(tmp_path)
    tower = Wav2Vec2Encoder(pretrained=str(tmp_path))
    assert tower.do_normalize is False and tower.uses_attention_mask is True


def test_pretrained_whisper_folder_loads_the_encoder_weights(tmp_path):
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    cfg = {k: v for k, v in WHISPER.items() if k != "model_type"}
    full = WhisperModel(WhisperConfig(**cfg, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
                                      max_target_positions=16))
    full.save_pretrained(tmp_path)
    tower = WhisperAudioEncoder(pretrained=str(tmp_path))
    for name, value in full.encoder.state_dict().items():
        assert torch.equal(tower.encoder.state_dict()[name], value), name
    assert tower.resolved_config()["pretrained"] is None


def test_registry_lists_the_speech_towers_with_a_purpose(capsys):
    from pipelines.cli import main

    assert main(["models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "audio=wav2vec2" in lines["wav2vec2-roberta"] and "emotion" in lines["wav2vec2-roberta"]
    assert "audio=whisper" in lines["whisper-roberta"] and "multilingual" in lines["xlsr-xlmr"]
    for name, kind in (("wav2vec2-roberta", "wav2vec2"), ("whisper-roberta", "whisper"), ("xlsr-xlmr", "wav2vec2")):
        assert name in list_models()
        assert get_model_config(name).audio_encoder.type == kind
        assert describe_model(name).endswith(".") and "speech" in describe_model(name)


@pytest.mark.parametrize("name", ["tiny-wav2vec2", "tiny-whisper"])
def test_layer_features_pool_every_layer_and_the_weighted_sum_is_their_mix(name):
    from clap_core.model.inference import embed_audio_layers

    torch.manual_seed(0)
    model = ClapModel(get_model_config(name)).eval()
    _, waves, lengths = speech_16k([30_000, 12_000])
    with torch.no_grad():
        model.audio_encoder.mix.weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
        fixed, valid = model.frontend.fixed_waveforms(waves, lengths)
        per_layer = model.audio_encoder.layer_features(fixed, valid)  # (2, 3, 32)
        pooled = model.audio_encoder(fixed, valid)
    assert per_layer.shape == (2, 3, 32)
    # mean pooling is linear: pooling the weighted sum = the weighted sum of the pooled layers
    expected = torch.einsum("l,blh->bh", torch.tensor([0.5, -1.0, 2.0]).softmax(0), per_layer)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)
    clips = [waves[0, :30_000].numpy(), waves[1, :12_000].numpy()]
    np.testing.assert_allclose(embed_audio_layers(model, clips), per_layer.numpy(), atol=1e-5)


def test_layer_drop_skips_the_same_layers_on_every_rank(tmp_path):
    """Different per-rank RNGs, one decision: ranks reducing different gradients would hang DDP / ZeRO."""
    import torch.multiprocessing as mp

    from tests.unit.train.rank_draws import draw_on_rank  # a light module: each spawned rank imports only it

    mp.spawn(draw_on_rank, args=(str(tmp_path / "store"), str(tmp_path / "draws")), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"draws.{r}") for r in (0, 1))
    assert rank0 == rank1 and len({tuple(d) for d in rank0}) > 1  # shared, and still random step to step


def test_onnx_export_refuses_a_speech_tower_with_the_reason(tmp_path):
    from clap_core.model.onnx_export import export_onnx

    model = ClapModel(get_model_config("tiny-whisper"))
    with pytest.raises(ValueError, match="speech tower to ONNX"):
        export_onnx(model, tmp_path / "onnx", audio_input="waveform")
    assert not (tmp_path / "onnx").exists()  # refused before anything is written
