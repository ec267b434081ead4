"""Python inference API: deterministic embeddings, paths and arrays, long audio, zero-shot, similarity."""
import numpy as np
import pytest
import soundfile as sf
import torch

from clap_core.audio.clips import split_windows
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ClapModel(get_model_config("tiny"))


def tone(freq: float, seconds: float, sr: int = 48_000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_embeddings_are_identical_across_calls_even_in_train_mode(model):
    clips = [tone(440, 5.0), tone(880, 1.0)]  # one longer than the 2 s window
    model.train()
    first = model.embed_audio(clips, sample_rate=48_000)
    second = model.embed_audio(clips, sample_rate=48_000)
    assert model.training  # the call restores the caller's mode
    assert np.array_equal(first, second)
    assert first.shape == (2, 64) and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)


def test_paths_and_arrays_at_other_rates_give_the_same_embedding(model, tmp_path):
    wave16k = tone(300, 1.5, sr=16_000)
    sf.write(tmp_path / "a.wav", wave16k, 16_000, subtype="FLOAT")
    from_path = model.embed_audio(str(tmp_path / "a.wav"))
    from_array = model.embed_audio(wave16k, sample_rate=16_000)
    assert np.allclose(from_path, from_array, atol=1e-6)
    with pytest.raises(ValueError, match="sample_rate"):
        model.embed_audio(wave16k)


def tone_files(folder, n: int) -> list[str]:
    """n WAV files of distinct tones and lengths (0.5-1.5 s at 48 kHz)."""
    paths = []
    for i in range(n):
        sf.write(folder / f"{i}.wav", tone(200 + 50 * i, 0.5 + 0.1 * i), 48_000, subtype="FLOAT")
        paths.append(str(folder / f"{i}.wav"))
    return paths


@pytest.mark.parametrize("threads", [1, 3])
def test_paths_are_decoded_a_batch_ahead_not_all_at_once(model, tmp_path, monkeypatch, threads):
    """embed_audio(paths), with 1 or 3 decode threads, decodes each file once, holds at most two batches of
    waveforms (the one embedded, the next one decoding), gives the embeddings of the decoded waveforms in order,
    and a file that does not decode raises its error, at the end of the list or inside it."""
    from clap_core.model import inference

    paths = tone_files(tmp_path, 11)
    loaded, loaded_when_embedding = [], []
    real_load, real_embed = inference.load_waveform, inference.embed_waveforms
    monkeypatch.setattr(inference, "load_waveform", lambda x, sr: loaded.append(x) or real_load(x, sr))
    monkeypatch.setattr(inference, "embed_waveforms",
                        lambda m, waves, *a: loaded_when_embedding.append(len(loaded)) or real_embed(m, waves, *a))
    out = model.embed_audio(paths, batch_size=3, decode_threads=threads)
    assert sorted(loaded) == sorted(paths) and len(loaded) == 11  # each file decoded once
    assert len(loaded_when_embedding) == 4 and all(n <= 3 * (k + 2) for k, n in enumerate(loaded_when_embedding))
    monkeypatch.undo()
    waves = [real_load(p, None) for p in paths]
    assert np.allclose(out, inference.embed_waveforms(model, waves, 3), atol=1e-6)
    (tmp_path / "bad.wav").write_bytes(b"RIFF not audio")
    for with_bad in (paths[:4] + [str(tmp_path / "bad.wav")], paths[:5] + [str(tmp_path / "bad.wav")] + paths[5:]):
        with pytest.raises(Exception, match="bad.wav"):
            model.embed_audio(with_bad, batch_size=2, decode_threads=threads)


def test_decode_threads_give_the_one_thread_embeddings_and_default_by_device(model, tmp_path):
    """Several decode threads return the same numbers as one, in input order; the default is 1 thread on CPU
    and at most 4 on a GPU; fewer than 1 is refused."""
    from clap_core.model import inference

    paths = tone_files(tmp_path, 10)
    one = model.embed_audio(paths, batch_size=4, decode_threads=1)
    assert np.array_equal(model.embed_audio(paths, batch_size=4, decode_threads=3), one)
    with pytest.raises(ValueError, match="decode_threads"):
        model.embed_audio(paths, decode_threads=0)
    assert inference.decode_threads_for(torch.device("cpu")) == 1
    assert 1 <= inference.decode_threads_for(torch.device("cuda")) <= 4


def test_long_audio_window_mean_equals_mean_of_window_embeddings(model):
    clip = np.concatenate([tone(300, 2.0), tone(3000, 2.0), tone(600, 1.0)])  # 5 s -> windows at 0, 2, 3 s
    parts = split_windows(clip, model.frontend.clip_samples)
    assert [len(p) for p in parts] == [96_000] * 3
    each = model.embed_audio(parts, sample_rate=48_000)
    mean = each.sum(0) / np.linalg.norm(each.sum(0))
    assert np.allclose(model.embed_audio(clip, sample_rate=48_000), mean, atol=1e-5)
    centre = model.embed_audio(clip, sample_rate=48_000, long_audio="center_crop")
    assert np.allclose(centre, model.embed_audio(clip[72_000:168_000], sample_rate=48_000), atol=1e-5)


def test_text_embeddings_batch_independent(model):
    together = model.embed_text(["a dog barks", "a much longer caption about heavy rain on a roof"])
    alone = model.embed_text("a dog barks")
    assert np.allclose(together[0], alone[0], atol=1e-5)


def test_zero_shot_probabilities_and_similarity(model):
    clips = [tone(440, 1.0), tone(2000, 1.0)]
    probs = model.zero_shot(clips, ["low tone", "high tone", "noise"], sample_rate=48_000)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    sim = model.similarity(clips, ["low tone", "high tone"], sample_rate=48_000)
    expected = model.embed_audio(clips, sample_rate=48_000) @ model.embed_text(["low tone", "high tone"]).T
    assert np.allclose(sim, expected, atol=1e-6)
    scale = float(model.logit_scales()[0].detach())
    cls = model.embed_text(["This is a sound of low tone.", "This is a sound of high tone.",
                            "This is a sound of noise."])
    logits = scale * model.embed_audio(clips, sample_rate=48_000) @ cls.T
    ref = np.exp(logits - logits.max(1, keepdims=True))
    assert np.allclose(probs, ref / ref.sum(1, keepdims=True), atol=1e-4)
