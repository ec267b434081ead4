"""precision="int8": LAION-CLAP's HTS-AT tiny audio encoder in static int8 (PT2E, AOTInductor) stays within cosine
0.999 of exact fp32 on decoded audio it was not calibrated on; it is compiled once per machine and weights, then
loaded from the cache; what it cannot run is refused with the reason."""
import copy
import types

import numpy as np
import pytest
import torch

from clap_core.model import int8_tower
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.model.inference import int8_copy
from tests.fixtures.audio import decoded_clips
from tests.fixtures.models import TINY_TEXT


def laion_sized(seed: int) -> ClapModel:
    torch.manual_seed(seed)
    return ClapModel(get_model_config("htsat-tiny-roberta", TINY_TEXT)).eval()


def test_int8_keeps_cosine_to_fp32_on_decoded_audio_and_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CLAP_CACHE_DIR", str(tmp_path))
    model = laion_sized(0)
    # 12 windows (the 13 s clip has two): a batch of 8 and one of 4 padded to 8
    clips = decoded_clips([10.0, 7.0, 10.0, 4.0, 13.0, 10.0, 3.0, 10.0, 10.0, 6.0, 10.0])
    exact = model.embed_audio(clips, sample_rate=48_000, precision="fp32")
    fast = model.embed_audio(clips, sample_rate=48_000, precision="int8")
    cosine = (exact * fast).sum(1)  # both unit-norm
    assert cosine.min() >= 0.999, cosine  # 0.9997 when measured
    assert np.allclose(np.linalg.norm(fast, axis=1), 1, atol=1e-5)
    encoder = int8_copy(model).audio_encoder
    assert isinstance(encoder, int8_tower.CompiledAudioEncoder) and model.audio_encoder is not encoder
    bf16 = model.embed_audio(clips, sample_rate=48_000, precision="bf16")
    assert not np.allclose(fast, bf16, atol=1e-4)  # int8 really ran, not the bf16 encoder
    alone = model.embed_audio(clips[:1], sample_rate=48_000, precision="int8")  # padded with 7 empty clips
    assert float((alone[0] * fast[0]).sum()) >= 0.99999  # static scales: a clip's embedding is its own
    assert len(list(tmp_path.glob("int8/audio-*.pt2"))) == 1

    def no_build(*args):
        raise AssertionError("built again")
    monkeypatch.setattr(int8_tower, "build_package", no_build)
    again = laion_sized(0)  # the same weights in another model: the package is loaded, not built
    np.testing.assert_allclose(again.embed_audio(clips, sample_rate=48_000, precision="int8"), fast, atol=1e-6)
    copied = copy.deepcopy(model)  # the compiled encoder is shared, the rest copied
    np.testing.assert_allclose(copied.embed_audio(clips[:2], sample_rate=48_000, precision="int8"), fast[:2],
                               atol=1e-6)


def test_the_package_key_follows_the_audio_weights_only():
    model, other = laion_sized(0), laion_sized(1)
    assert int8_tower.package_key(model) == int8_tower.package_key(laion_sized(0))
    assert int8_tower.package_key(model) != int8_tower.package_key(other)
    other.audio_encoder.load_state_dict(model.audio_encoder.state_dict())  # text tower still different
    assert int8_tower.package_key(model) == int8_tower.package_key(other)
    key, threads = int8_tower.package_key(model), torch.get_num_threads()
    try:  # the kernels take the caller's thread count at run time: one package serves any count
        torch.set_num_threads(threads + 1)
        assert int8_tower.package_key(model) == key
    finally:
        torch.set_num_threads(threads)


def test_calibration_clips_are_fixed_and_span_silence_to_full_scale():
    waves = int8_tower.calibration_waves(48_000, 48_000)
    assert len(waves) == int8_tower.CALIBRATION_CLIPS
    again = int8_tower.calibration_waves(48_000, 48_000)
    assert all(np.array_equal(a, b) for a, b in zip(waves, again))  # the same int8 model on every machine
    rms = [float(np.sqrt(np.mean(w.astype(np.float64) ** 2))) for w in waves]
    assert rms[0] == 0 and max(rms) > 0.5 and min(r for r in rms if r > 0) < 2e-3
    assert all(w.dtype == np.float32 and np.abs(w).max() <= 1 for w in waves)


def test_what_int8_cannot_run_is_refused_with_the_reason():
    clip = [np.zeros(48_000, np.float32)]
    fused = ClapModel(get_model_config("htsat-tiny-roberta-fused", TINY_TEXT)).eval()
    with pytest.raises(ValueError, match="fusion"):
        fused.embed_audio(clip, sample_rate=48_000, precision="int8")
    speech = ClapModel(get_model_config("tiny-wav2vec2")).eval()
    with pytest.raises(ValueError, match="reads the waveform"):
        speech.embed_audio(clip, sample_rate=48_000, precision="int8")
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(ValueError, match="runs on CPU"):
        int8_tower.check_int8(on_gpu)


def test_the_compiled_encoder_runs_fixed_batches_of_both_inputs_and_drops_the_padding():
    """The exported graph takes (mel (8, C, T, F), is_longer (8, 1)) whether or not the encoder reads is_longer
    (the `tiny` model's conv encoder does not: it was called with the mel alone, and the package refused)."""
    calls = []

    def runner(mel, is_longer):  # stands in for the AOTInductor package: one feature per clip
        calls.append((tuple(mel.shape), is_longer.dtype, is_longer[:, 0].tolist()))
        return mel.mean(dim=(1, 2, 3))[:, None].repeat(1, 4)

    for takes_is_longer in (False, True):
        calls.clear()
        encoder = int8_tower.CompiledAudioEncoder(runner, (1, 5, 3), takes_is_longer)
        mel = torch.arange(11 * 15, dtype=torch.float32).reshape(11, 1, 5, 3)
        flags = torch.tensor([[i % 2 == 0] for i in range(11)])
        out = encoder(mel, flags) if takes_is_longer else encoder(mel)
        assert out.shape == (11, 4) and torch.equal(out[:, 0], mel.mean(dim=(1, 2, 3)))  # padding dropped
        assert [c[0] for c in calls] == [(8, 1, 5, 3)] * 2 and {c[1] for c in calls} == {torch.bool}
        expected = [i % 2 == 0 for i in range(11)] if takes_is_longer else [False] * 11
        assert calls[0][2] + calls[1][2][:3] == expected and calls[1][2][3:] == [False] * 5
    with pytest.raises(ValueError, match="compiled for log-mel"):
        encoder(torch.zeros(2, 1, 6, 3))
