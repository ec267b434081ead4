"""The fast inference path (bf16 autocast, the default where the device has native bf16) stays within
cosine 0.999 of exact fp32 on decoded audio; precision="fp32" is the exact path."""
import numpy as np
import pytest
import torch

from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.model.inference import native_bf16, pad_batch, resolve_precision
from tests.fixtures.audio import decoded_clips
from tests.fixtures.models import TINY_TEXT


@pytest.fixture(scope="module")
def laion_sized_audio():
    """LAION-CLAP's full HTS-AT tiny audio tower (random init); a toy text tower keeps the build cheap."""
    torch.manual_seed(0)
    return ClapModel(get_model_config("htsat-tiny-roberta", TINY_TEXT)).eval()


def test_bf16_embeddings_keep_cosine_to_fp32_on_decoded_audio(laion_sized_audio):
    model = laion_sized_audio
    clips = decoded_clips([10.0, 4.0, 13.0])  # full window, padded, and two windows (window_mean)
    exact = model.embed_audio(clips, sample_rate=48_000, precision="fp32")
    fast = model.embed_audio(clips, sample_rate=48_000, precision="bf16")
    cosine = (exact * fast).sum(1)  # both unit-norm
    assert cosine.min() >= 0.999, cosine
    assert not np.array_equal(exact, fast)  # bf16 really ran
    assert np.allclose(np.linalg.norm(fast, axis=1), 1, atol=1e-5)
    captions = ["a low voice speaking in short syllables with brown noise", "a high pitched steady tone"]
    text_cos = (model.embed_text(captions, precision="fp32") * model.embed_text(captions, precision="bf16")).sum(1)
    assert text_cos.min() >= 0.999, text_cos


def test_fp32_is_exact_and_auto_follows_the_hardware(laion_sized_audio):
    model = laion_sized_audio
    clips = decoded_clips([3.0, 10.0])
    with torch.no_grad():
        reference = model.encode_audio(*pad_batch(clips)[:1], lengths=pad_batch(clips)[1]).numpy()
    # exact up to float rounding: window_mean renormalises the (single-window) mean
    assert np.allclose(model.embed_audio(clips, sample_rate=48_000, precision="fp32"), reference, atol=1e-6)
    expected = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected
    auto = model.embed_audio(clips, sample_rate=48_000)
    assert np.array_equal(auto, model.embed_audio(clips, sample_rate=48_000, precision=expected))
    with pytest.raises(ValueError, match="precision"):
        model.embed_audio(clips, sample_rate=48_000, precision="fp16")


def test_bf16_path_runs_a_cached_bf16_copy_that_follows_weight_changes():
    from clap_core.model.inference import bf16_copy, drop_bf16_copy

    torch.manual_seed(0)
    model = ClapModel(get_model_config("tiny")).eval()
    torch.manual_seed(1)
    other = ClapModel(get_model_config("tiny")).eval()
    clips = decoded_clips([2.0, 3.0])
    first = model.embed_audio(clips, sample_rate=48_000, precision="bf16")
    fast = bf16_copy(model)
    assert fast is bf16_copy(model)  # cached: one copy per set of weights
    assert next(fast.audio_encoder.parameters()).dtype == torch.bfloat16
    assert next(model.audio_encoder.parameters()).dtype == torch.float32  # the model itself is untouched
    assert not any("bf16" in k for k in model.state_dict())  # not a submodule: never saved or exported
    model.load_state_dict(other.state_dict())  # new weights: the copy is rebuilt from them
    assert bf16_copy(model) is not fast
    after = model.embed_audio(clips, sample_rate=48_000, precision="bf16")
    assert np.array_equal(after, other.embed_audio(clips, sample_rate=48_000, precision="bf16"))
    assert not np.allclose(after, first, atol=1e-3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # a training step changes weights in place
    model.train()
    model.encode_audio(torch.from_numpy(clips[0])[None]).sum().backward()
    optimizer.step()
    model.eval()
    stepped = bf16_copy(model)
    for mine, copied in zip(model.audio_encoder.parameters(), stepped.audio_encoder.parameters()):
        assert torch.equal(mine.detach().to(torch.bfloat16), copied)
    drop_bf16_copy(model)
    assert "_bf16_copy" not in model.__dict__


def test_bf16_copy_casts_the_towers_in_one_pass_and_leaves_the_rest_fp32():
    import copy

    from clap_core.model.inference import bf16_copy

    torch.manual_seed(0)
    model = ClapModel(get_model_config("tiny")).eval()
    model.audio_projection.shared = model.text_projection  # a module two towers hold: it stays one module
    for p in model.parameters():  # a model mid-training: its gradients are not copied into the inference copy
        p.grad = torch.ones_like(p)
    reference = copy.deepcopy(model)  # what the copy must equal: the towers cast with .to(), the rest untouched
    for tower in (reference.text_encoder, reference.text_projection, reference.audio_projection,
                  reference.audio_encoder):
        tower.to(torch.bfloat16)
    fast = bf16_copy(model)
    expected, got = reference.state_dict(keep_vars=True), fast.state_dict(keep_vars=True)
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
        assert type(tensor) is type(expected[name]), name  # parameters stay parameters, buffers plain tensors
    mel_buffers = list(fast.frontend.buffers())  # the log-mel front end stays fp32
    assert mel_buffers and all(t.dtype == torch.float32 for t in mel_buffers)
    original = {t.data_ptr() for t in model.state_dict().values()}
    assert not original & {t.data_ptr() for t in got.values()}  # nothing shared with the fp32 model
    assert fast.audio_projection.shared is fast.text_projection
    assert all(p.grad is None for p in fast.text_encoder.parameters())
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
