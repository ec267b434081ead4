"""Tests for clap_core.audio.augment: determinism, recorded parameters match the applied
effects, mixing formula, impulse responses, caption merging."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from clap_core.audio import augment as aug
from clap_core.audio.augment import AugmentConfig
from clap_core.audio.codec import TARGET_SR
from clap_core.data import captions

SR = TARGET_SR
REPO_ROOT = Path(__file__).resolve().parents[3]


def tone(freq: float, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * freq * t))[None, :].astype(np.float32)  # (1, N)


def impulse(seconds: float = 1.0) -> np.ndarray:
    wave = np.zeros((1, int(SR * seconds)), np.float32)
    wave[0, 0] = 0.5
    return wave


def only(effect: str, **overrides) -> AugmentConfig:
    """Config with a single effect always on and every other effect off."""
    probs = {f"{name}_prob": 0.0 for name in ("reverb", "clipping", "pitch_shift", "time_mask", "freq_mask")}
    probs[f"{effect}_prob"] = 1.0
    return AugmentConfig(**probs, **overrides)


ALL_ON = AugmentConfig(reverb_prob=1.0, clipping_prob=1.0, pitch_shift_prob=1.0, time_mask_prob=1.0, freq_mask_prob=1.0)


def peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * SR / len(x))


def band_level_db(x: np.ndarray, freq: float) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(round(freq * len(x) / SR))
    return float(20 * np.log10(spectrum[k - 3 : k + 4].max() + 1e-12))


def busy_clip() -> np.ndarray:
    """Loud tone + noise, (1, N), to stress every effect."""
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, size=(1, SR)).astype(np.float32)
    return np.clip(tone(300.0, amp=0.6) + noise, -0.99, 0.99)


# -----------------------------------------------------------------------------
# determinism


def test_same_seed_id_copy_gives_identical_audio_and_params():
    wave = busy_clip()
    a, params_a = aug.augment_clip(wave, "clip-1", 0, ALL_ON)
    b, params_b = aug.augment_clip(wave.copy(), "clip-1", 0, ALL_ON)
    np.testing.assert_array_equal(a, b)
    assert params_a == params_b


@pytest.mark.parametrize("change", [("copy", 1), ("clip_id", "clip-2"), ("seed", 7)])
def test_changing_copy_clip_or_seed_changes_the_copy(change):
    wave = busy_clip()
    base, base_params = aug.augment_clip(wave, "clip-1", 0, ALL_ON)
    copy_index = change[1] if change[0] == "copy" else 0
    clip_id = change[1] if change[0] == "clip_id" else "clip-1"
    cfg = dataclasses.replace(ALL_ON, seed=change[1]) if change[0] == "seed" else ALL_ON
    other, other_params = aug.augment_clip(wave, clip_id, copy_index, cfg)
    assert not np.array_equal(base, other)
    assert base_params != other_params


def test_output_is_identical_in_a_fresh_process():
    script = (
        "import hashlib, json, numpy as np\n"
        "from clap_core.audio import augment as aug\n"
        "from tests.unit.audio.test_augment import busy_clip, ALL_ON\n"
        "out, params = aug.augment_clip(busy_clip(), 'clip-1', 3, ALL_ON)\n"
        "print(hashlib.sha256(out.tobytes()).hexdigest(), json.dumps(params, sort_keys=True))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    out, params = aug.augment_clip(busy_clip(), "clip-1", 3, ALL_ON)
    expected = f"{hashlib.sha256(out.tobytes()).hexdigest()} {json.dumps(params, sort_keys=True)}"
    assert result.stdout.strip() == expected


def test_stable_seed_is_blake2b_not_python_hash():
    digest = hashlib.blake2b(b"0/clip/1/reverb", digest_size=8).digest()
    assert aug.stable_seed(0, "clip", 1, "reverb") == int.from_bytes(digest, "little")


def test_augmentation_does_not_touch_global_random_state():
    import random

    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    aug.augment_clip(busy_clip(), "clip-1", 0, ALL_ON)
    assert (random.random(), np.random.random()) == expected


# -----------------------------------------------------------------------------
# recorded parameters match what was applied


def test_all_probabilities_zero_is_the_identity():
    cfg = AugmentConfig(reverb_prob=0, clipping_prob=0, pitch_shift_prob=0, time_mask_prob=0, freq_mask_prob=0)
    wave = busy_clip()
    out, params = aug.augment_clip(wave, "clip-1", 0, cfg)
    assert params == {}
    np.testing.assert_array_equal(out, wave)


def test_params_are_json_serialisable_and_list_every_effect():
    out, params = aug.augment_clip(busy_clip(), "clip-1", 0, ALL_ON, env=tone(50.0), env_id="env-9")
    assert json.loads(json.dumps(params)) == params
    assert set(params) >= {"env_mix", "reverb", "pitch_shift", "clipping", "time_mask", "freq_mask"}


def test_pitch_shift_moves_the_tone_by_the_recorded_semitones():
    out, params = aug.augment_clip(tone(440.0, 2.0), "clip-1", 0, only("pitch_shift"))
    assert set(params) == {"pitch_shift"}
    semitones = params["pitch_shift"]["semitones"]
    assert -3.0 <= semitones <= 3.0 and abs(semitones) > 0.1
    assert abs(peak_hz(out[0]) - 440.0 * 2 ** (semitones / 12)) <= 2 * SR / out.shape[1]


def test_clipping_clips_the_recorded_percentage():
    wave = np.random.default_rng(1).uniform(-0.8, 0.8, size=(1, SR)).astype(np.float32)
    out, params = aug.augment_clip(wave, "clip-3", 0, only("clipping", clipping_percent_range=(10, 30)))
    percent = params["clipping"]["percent"]
    assert 10 <= percent <= 30
    at_rails = np.mean((out[0] == out.max()) | (out[0] == out.min()))
    assert at_rails == pytest.approx(percent / 100, abs=0.01)


def test_time_mask_silences_exactly_the_recorded_span():
    wave = busy_clip()
    out, params = aug.augment_clip(wave, "clip-1", 0, only("time_mask"))
    start, length = params["time_mask"]["start_sample"], params["time_mask"]["num_samples"]
    assert 0.02 * SR <= length <= 0.15 * SR + 1
    fade = int(0.005 * SR)  # audiomentations' default fade at both edges of the mask
    assert not out[0, start + fade : start + length - fade].any()
    np.testing.assert_array_equal(out[0, :start], wave[0, :start])
    np.testing.assert_array_equal(out[0, start + length :], wave[0, start + length :])


def test_freq_mask_removes_the_recorded_band_only():
    wave = (tone(1000.0, 1.0, 0.3) + tone(6000.0, 1.0, 0.3)).astype(np.float32)
    cfg = only("freq_mask", freq_mask_center_hz_range=(1000.0, 1000.0), freq_mask_bandwidth_range=(0.4, 0.4))
    out, params = aug.augment_clip(wave, "clip-1", 0, cfg)
    assert params["freq_mask"]["center_hz"] == pytest.approx(1000.0)
    assert params["freq_mask"]["bandwidth_hz"] == pytest.approx(400.0)
    assert band_level_db(out[0], 1000.0) < band_level_db(wave[0], 1000.0) - 30
    assert band_level_db(out[0], 6000.0) == pytest.approx(band_level_db(wave[0], 6000.0), abs=1.0)


def test_synthetic_reverb_of_an_impulse_is_an_ir_of_the_recorded_rt60():
    out, params = aug.augment_clip(impulse(1.5), "clip-1", 0, only("reverb"))
    reverb = params["reverb"]
    assert reverb["ir"] == "synthetic"
    assert 0.2 <= reverb["rt60"] <= 1.0 and 0.0 <= reverb["drr_db"] <= 12.0
    ir_length = int(reverb["rt60"] * SR)  # the IR ends at the drawn rt60
    assert np.abs(out[0, ir_length:]).max() < 1e-6 * out[0, 0]  # only FFT round-off after it
    assert np.abs(out[0, ir_length - 200 : ir_length]).max() > 1e-5 * out[0, 0]
    energy = out[0] ** 2
    assert energy[1:].sum() / energy[0] == pytest.approx(10 ** (-reverb["drr_db"] / 10), rel=1e-3)


def test_reverb_keeps_the_dry_loudness():
    wave = 0.3 * busy_clip()  # quiet enough that the peak limiter stays off
    out, _ = aug.augment_clip(wave, "clip-1", 0, only("reverb"))
    assert np.sqrt(np.mean(out**2)) == pytest.approx(np.sqrt(np.mean(wave**2)), rel=1e-4)
    assert not np.allclose(out, wave)


def test_reverb_uses_impulse_responses_from_a_folder(tmp_path):
    echoes = {"hall.wav": 0.1, "room/small.flac": 0.02}  # echo delay in seconds per IR file
    for name, delay in echoes.items():
        ir = np.zeros(int(0.2 * SR), np.float32)
        ir[0], ir[int(delay * SR)] = 1.0, 0.5
        (tmp_path / name).parent.mkdir(exist_ok=True)
        sf.write(tmp_path / name, ir, SR, subtype="FLOAT" if name.endswith("wav") else "PCM_24")

    cfg = only("reverb", reverb_ir_dir=str(tmp_path))
    chosen = set()
    for copy_index in range(8):
        out, params = aug.augment_clip(impulse(), "clip-1", copy_index, cfg)
        name = params["reverb"]["ir"]
        chosen.add(name)
        taps = np.flatnonzero(np.abs(out[0]) > 1e-3)
        assert list(taps) == [0, int(echoes[name] * SR)]
        assert out[0, taps[1]] / out[0, 0] == pytest.approx(0.5, rel=1e-6)
    assert chosen == set(echoes)


def test_explicit_ir_bank_overrides_the_folder():
    ir = np.zeros(1000, np.float32)
    ir[0], ir[500] = 1.0, -0.25
    out, params = aug.augment_clip(impulse(), "c", 0, only("reverb", reverb_ir_dir="/nonexistent"), ir_bank={"mine": ir})
    assert params["reverb"] == {"ir": "mine"}
    assert out[0, 500] / out[0, 0] == pytest.approx(-0.25)


def test_synthetic_rir_decays_and_has_a_unit_direct_path():
    ir = aug.synthetic_rir(np.random.default_rng(0), rt60=0.6, drr_db=3.0, n_reflections=8)
    tenth = len(ir) // 10
    assert len(ir) == int(0.6 * SR) and ir[0] == 1.0
    assert np.sum(ir[-tenth:] ** 2) < 1e-4 * np.sum(ir[:tenth] ** 2)
    assert 1.0 / np.sum(ir[1:] ** 2) == pytest.approx(10 ** 0.3, rel=1e-4)


def test_output_is_finite_and_peak_limited():
    loud = np.clip(busy_clip() * 3, -1.0, 1.0)
    for copy_index in range(4):
        out, params = aug.augment_clip(loud, "loud", copy_index, ALL_ON, env=tone(80.0, 0.3, 1.0))
        assert out.shape == loud.shape and out.dtype == np.float32
        assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
        if "peak_limit" in params:
            assert np.abs(out).max() == pytest.approx(1.0)


def test_non_finite_input_is_rejected():
    wave = busy_clip()
    wave[0, 10] = np.nan
    with pytest.raises(ValueError):
        aug.augment_clip(wave, "bad", 0, ALL_ON)


# -----------------------------------------------------------------------------
# environmental mix


@pytest.mark.parametrize("env_len", [300, 1000, 2500])
def test_mix_equals_the_formula_with_env_looped_or_cropped(env_len):
    rng = np.random.default_rng(0)
    speech = rng.uniform(-1, 1, size=(1, 1000)).astype(np.float32)
    env = rng.uniform(-1, 1, size=(1, env_len)).astype(np.float32)
    lam = 0.37
    env_fit = np.resize(env[0], 1000)[None, :]  # np.resize repeats the data cyclically
    np.testing.assert_array_equal(aug.mix_speech_env(speech, env, lam), lam * speech + (1 - lam) * env_fit)


def test_draw_mix_lambda_stays_in_range():
    rng = np.random.default_rng(0)
    draws = [aug.draw_mix_lambda(rng, 0.01, 0.8) for _ in range(2000)]
    assert 0.01 <= min(draws) and max(draws) <= 0.8
    assert max(draws) - min(draws) > 0.7


def test_augment_clip_records_and_applies_the_env_mix():
    speech, env = tone(440.0, 0.5), tone(2000.0, 0.2, 0.2)
    cfg = AugmentConfig(reverb_prob=0, clipping_prob=0, pitch_shift_prob=0, time_mask_prob=0, freq_mask_prob=0)
    out, params = aug.augment_clip(speech, "s1", 0, cfg, env=env, env_id="e7")
    lam = params["env_mix"]["lambda"]
    assert params["env_mix"]["env_id"] == "e7" and 0.01 <= lam <= 0.8
    np.testing.assert_array_equal(out, aug.mix_speech_env(speech, env, lam))
    _, no_mix = aug.augment_clip(speech, "s1", 0, dataclasses.replace(cfg, mix_prob=0.0), env=env)
    assert "env_mix" not in no_mix


def test_pairing_is_deterministic_and_independent_of_env_order():
    speech = [f"s{i}" for i in range(50)]
    env = [f"e{i}" for i in range(7)]
    pairs = aug.pair_speech_with_env(speech, env, seed=0)
    assert pairs == aug.pair_speech_with_env(speech, env[::-1], seed=0)
    assert [s for s, _ in pairs] == speech and {e for _, e in pairs} <= set(env)
    assert len({e for _, e in pairs}) > 3  # spread over partners, not one env for everybody
    assert pairs != aug.pair_speech_with_env(speech, env, seed=1)
    with pytest.raises(ValueError):
        aug.pair_speech_with_env(speech, [], seed=0)


# -----------------------------------------------------------------------------
# caption merging


def test_template_merger_default_and_custom_template():
    assert captions.TemplateCaptionMerger()("Hello, how are you?", "Rain falls on a roof.") == (
        "a person saying hello, how are you, with rain falls on a roof in the background"
    )
    merge = captions.build_caption_merger("template", template="{speech}, with {env} in the background")
    merged = merge('A man says "hello".', "Rain falls on a roof.")
    assert merged == 'a man says "hello", with rain falls on a roof in the background'


@pytest.mark.parametrize(
    "caption,clause",
    [
        ("A man says hello.", "a man says hello"),
        ("  Dogs   bark!!  ", "dogs bark"),
        ("BBC news is playing...", "BBC news is playing"),
        ("I think it rains.", "I think it rains"),
        ("I'm singing", "I'm singing"),
        ('She says "stop."', 'she says "stop."'),
        ("", ""),
    ],
)
def test_as_clause_rule(caption, clause):
    assert captions.as_clause(caption) == clause


def test_merger_registry():
    assert set(captions.CAPTION_MERGERS) == {"template", "seq2seq"}
    with pytest.raises(KeyError):
        captions.build_caption_merger("nope")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> str:
    """A randomly initialised 1-layer T5 and a WordLevel tokenizer, saved offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = "merge captions speech background a man says hello rain falls on roof with in the , .".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(vocab), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    model = T5ForConditionalGeneration(config)
    # an untrained model tends to stop at once; force a few real tokens so the output is non-trivial
    model.generation_config.min_new_tokens = 4
    model.generation_config.suppress_tokens = [0, 2]
    path = tmp_path_factory.mktemp("tiny_t5")
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


def test_seq2seq_merger_returns_a_deterministic_string(tiny_t5):
    merge = captions.build_caption_merger("seq2seq", model_name_or_path=tiny_t5, max_new_tokens=6)
    first = merge('A man says "hello".', "Rain falls on a roof.")
    assert isinstance(first, str) and first
    assert len(first.split()) <= 6
    again = captions.Seq2SeqCaptionMerger(tiny_t5, max_new_tokens=6)('A man says "hello".', "Rain falls on a roof.")
    assert first == again
