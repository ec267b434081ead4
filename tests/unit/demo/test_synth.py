"""Tests for clap_demo.synth: clips sound like their captions, corpora are deterministic
and decodable, the rejects zoo triggers the documented reasons."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from clap_core.audio import codec as aio
from clap_demo import synth
from clap_demo.synth import ClipSpec

SR = 48_000
FORMATS = ("wav", "flac", "ogg", "mp3", "m4a")


def spectrum(x: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.rfft(x * np.hanning(len(x))))


def peak_hz(x: np.ndarray, sr: int = SR, min_hz: float = 0.0) -> float:
    """Frequency of the spectral peak at or above min_hz."""
    mag = spectrum(x)
    first = int(np.ceil(min_hz * len(x) / sr))
    return float((first + np.argmax(mag[first:])) * sr / len(x))


TONE_MIN_HZ = 150.0  # brown noise lives below this; a swept tone spreads thinner than its rumble


def energy_fraction(x: np.ndarray, lo_hz: float, hi_hz: float, sr: int = SR) -> float:
    power = spectrum(x) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / sr)
    return float(power[(freqs >= lo_hz) & (freqs < hi_hz)].sum() / power.sum())


def frame_rms(x: np.ndarray, frame: int = SR // 100) -> np.ndarray:
    """RMS per 10 ms frame: the amplitude envelope at 100 Hz."""
    n = len(x) // frame
    return np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1))


def tone_band(label_pitch: str, glide: str) -> tuple[float, float]:
    """Frequencies a tone sweeps through, with 3% margin."""
    f = synth.TONE_HZ[label_pitch]
    ends = sorted([f, f * 2 ** synth.GLIDE_OCTAVES[glide]])
    return ends[0] * 0.97, ends[1] * 1.03


# -----------------------------------------------------------------------------
# single clips


def test_make_clip_is_deterministic_and_seeded():
    spec = ClipSpec(kind="speech", pitch="low", pattern="pulsed", noise="white", seed=5)
    a = synth.make_clip(spec, 16000, 1.0)
    assert a.dtype == np.float32 and a.shape == (16000,)
    np.testing.assert_array_equal(a, synth.make_clip(spec, 16000, 1.0))
    reseeded = ClipSpec(kind="speech", pitch="low", pattern="pulsed", noise="white", seed=6)
    assert not np.array_equal(a, synth.make_clip(reseeded, 16000, 1.0))
    assert np.abs(a).max() == pytest.approx(synth.PEAK)


@pytest.mark.parametrize("pitch", ["low", "high"])
@pytest.mark.parametrize("glide", ["none", "rising", "falling"])
@pytest.mark.parametrize("noise", ["none", "white", "brown"])
def test_tone_peak_matches_pitch_and_glide(pitch, glide, noise):
    x = synth.make_clip(ClipSpec(pitch=pitch, pattern="pulsed", noise=noise, glide=glide, seed=1), SR, 1.0)
    lo, hi = tone_band(pitch, glide)
    assert lo <= peak_hz(x, min_hz=TONE_MIN_HZ) <= hi
    assert (peak_hz(x, min_hz=TONE_MIN_HZ) > 1000) == (pitch == "high")


@pytest.mark.parametrize("kind", ["env", "speech"])
def test_pulsed_clips_pulse_at_4hz_and_steady_ones_do_not(kind):
    pulsed = frame_rms(synth.make_clip(ClipSpec(kind=kind, pattern="pulsed", seed=2), SR, 2.0))
    envelope_spectrum = np.abs(np.fft.rfft(pulsed - pulsed.mean()))
    assert np.argmax(envelope_spectrum) * 100 / len(pulsed) == pytest.approx(synth.PULSE_HZ, abs=0.5)
    steady = frame_rms(synth.make_clip(ClipSpec(kind=kind, pattern="steady", seed=2), SR, 2.0))[2:-2]
    assert steady.std() / steady.mean() < 0.15


def test_noise_colour_is_audible_in_the_spectrum():
    clips = {n: synth.make_clip(ClipSpec(pitch="high", noise=n, seed=3), SR, 1.0) for n in ("none", "white", "brown")}
    assert energy_fraction(clips["white"], 8000, 24000) > 0.05
    assert energy_fraction(clips["brown"], 0, 100) > 0.05
    assert energy_fraction(clips["brown"], 8000, 24000) < 1e-3
    assert energy_fraction(clips["none"], 8000, 24000) < 1e-4
    assert energy_fraction(clips["none"], 0, 100) < 1e-4


@pytest.mark.parametrize("pitch", ["low", "high"])
def test_voice_is_a_harmonic_comb_on_its_f0(pitch):
    f0 = synth.VOICE_F0_HZ[pitch]
    x = synth.make_clip(ClipSpec(kind="speech", pitch=pitch, seed=4), SR, 2.0)
    mag = spectrum(x)

    def level(freq):  # max within +-15 Hz: room for the 1% vibrato (0.5 Hz bins)
        k = int(freq * len(x) / SR)
        return mag[k - 30 : k + 31].max()

    harmonics = [level(k * f0) for k in range(2, 10)]
    in_between = [level((k + 0.5) * f0) for k in range(2, 10)]
    assert np.mean(harmonics) > 20 * np.mean(in_between)
    assert energy_fraction(x, 4500, 24000) < 1e-3  # band-limited like speech


def test_captions_and_labels_name_the_factors():
    spec = ClipSpec(kind="env", pitch="high", pattern="pulsed", noise="white", glide="rising")
    assert spec.caption == "a high pitched pulsed tone rising in pitch with white noise"
    assert spec.label == "high pulsed tone"
    voice = ClipSpec(kind="speech", pitch="low", pattern="steady", noise="none")
    assert voice.caption == "a low voice holding a long vowel"
    assert voice.label == "low steady voice"


def test_split_rule_is_stable_and_roughly_80_10_10():
    splits = [synth.split_of(f"clip-{i}") for i in range(3000)]
    assert splits == [synth.split_of(f"clip-{i}") for i in range(3000)]
    shares = {s: splits.count(s) / len(splits) for s in ("train", "valid", "test")}
    assert shares["train"] == pytest.approx(0.8, abs=0.03)
    assert shares["valid"] == pytest.approx(0.1, abs=0.02) and shares["test"] == pytest.approx(0.1, abs=0.02)


# -----------------------------------------------------------------------------
# corpus on disk


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synth.write_corpus(tmp_path_factory.mktemp("corpus"), n_clips=20, seed=0)


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_corpus_is_deterministic(corpus, tmp_path):
    again = synth.write_corpus(tmp_path / "again", n_clips=20, seed=0)
    assert again.read_text() == corpus.read_text()
    for row in read_manifest(corpus):
        first, sr1 = aio.decode_audio(corpus.parent / row["audio_path"], mono=False, target_sr=None)
        second, sr2 = aio.decode_audio(again.parent / row["audio_path"], mono=False, target_sr=None)
        assert sr1 == sr2
        np.testing.assert_array_equal(first, second)
    other = synth.write_corpus(tmp_path / "other", n_clips=20, seed=1)
    assert other.read_text() != corpus.read_text()


def test_corpus_manifest_rows(corpus):
    rows = read_manifest(corpus)
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    for r in rows:
        assert set(r) == {"id", "audio_path", "caption", "label", "split", "kind", "language"}
        assert (corpus.parent / r["audio_path"]).is_file()
        assert r["split"] == synth.split_of(r["id"]) and r["language"] == "en"
        assert r["kind"] in ("speech", "env")
        assert r["label"].endswith("voice" if r["kind"] == "speech" else "tone")
        pitch, pattern, _ = r["label"].split()
        assert pitch in r["caption"] and (pattern in r["caption"] or r["kind"] == "speech")


def test_corpus_mixes_formats_rates_and_channels_and_all_decode(corpus):
    rows = read_manifest(corpus)
    assert {Path(r["audio_path"]).suffix[1:] for r in rows} == set(FORMATS)
    rates, channels = set(), set()
    for r in rows:
        wave, sr = aio.decode_audio(corpus.parent / r["audio_path"], mono=False, target_sr=None)
        rates.add(sr)
        channels.add(wave.shape[0])
        padding = 0.0 if r["audio_path"].endswith((".wav", ".flac")) else 0.1  # lossy codec priming/padding
        assert 1.0 <= wave.shape[1] / sr <= 3.0 + padding
    assert rates <= {16000, 22050, 44100, 48000} and len(rates) >= 3
    assert channels == {1, 2}


def test_corpus_audio_matches_captions(corpus):
    for r in read_manifest(corpus):
        if r["kind"] != "env":
            continue
        wave, _ = aio.decode_audio(corpus.parent / r["audio_path"])  # (1, N) at 48 kHz
        pitch = r["label"].split()[0]
        glide = next((g for g in ("rising", "falling") if g in r["caption"]), "none")
        lo, hi = tone_band(pitch, glide)
        assert lo <= peak_hz(wave[0], min_hz=TONE_MIN_HZ) <= hi, r
        if "white noise" in r["caption"]:
            assert energy_fraction(wave[0], 3000, 7000) > 0.01  # every rate keeps this band
        else:
            assert energy_fraction(wave[0], 3000, 7000) < 0.01


# -----------------------------------------------------------------------------
# rejects zoo


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("bad")
    return out, synth.write_bad_inputs(out, min_seconds=0.5, max_seconds=30.0)


AUDIO_REASONS = {"missing_file", "empty_file", "undecodable", "decode_failed", "nan_or_inf", "too_many_channels"}


def test_bad_audio_raises_the_expected_reason(bad_inputs):
    out, rows = bad_inputs
    for row in rows:
        path = out / row["audio_path"]
        if row["expected_reason"] in AUDIO_REASONS:
            with pytest.raises(aio.AudioDecodeError) as info:
                aio.decode_audio(path, max_channels=6)
            assert info.value.reason == row["expected_reason"], row["id"]
        else:
            wave, sr = aio.decode_audio(path, max_channels=6)
            assert sr == aio.TARGET_SR and wave.shape[0] == 1


def test_borderline_audio_has_the_property_its_reason_names(bad_inputs):
    out, rows = bad_inputs
    by_reason = {r["expected_reason"]: r for r in rows}
    silence, _ = aio.decode_audio(out / by_reason["silent"]["audio_path"])
    assert not silence.any()
    assert aio.probe_duration(out / by_reason["too_short"]["audio_path"]) < 0.5
    assert aio.probe_duration(out / by_reason["too_long"]["audio_path"]) > 30.0
    ok = next(r for r in rows if r["id"] == "ok-8k")
    native, sr = aio.decode_audio(out / ok["audio_path"], target_sr=None)
    assert sr == 8000 and peak_hz(native[0], sr) > 1000  # a valid "high" tone, only at a low rate


def test_csv_manifest_holds_raw_bytes_and_matches_the_rows(bad_inputs):
    out, rows = bad_inputs
    raw = (out / "manifest.csv").read_bytes()
    lines = raw.split(b"\n")[1:-1]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        if row["expected_reason"] == "caption_not_utf8":
            with pytest.raises(UnicodeDecodeError):
                line.decode("utf-8")
            assert row["caption"] == synth.NON_UTF8_CAPTION and synth.NON_UTF8_CAPTION in line
        else:
            line.decode("utf-8")
    parsed = list(csv.DictReader(io.StringIO(raw.decode("utf-8", "surrogateescape"))))
    assert [p["id"] for p in parsed] == [r["id"] for r in rows]
    assert [p["audio_path"] for p in parsed] == [r["audio_path"] for r in rows]
    assert parsed[[r["expected_reason"] for r in rows].index("empty_caption")]["caption"] == ""
    assert [r["id"] for r in rows].count("dup") == 2
    assert {r["expected_reason"] for r in rows} == AUDIO_REASONS | {
        None, "silent", "too_short", "too_long", "empty_caption", "caption_not_utf8", "duplicate_id"
    }
