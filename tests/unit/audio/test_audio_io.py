"""Tests for clap_core.audio.codec: every supported format decodes to 48 kHz, bad inputs
raise the right reason, FLAC storage is exact and deterministic."""

import io

import av
import numpy as np
import pytest
import soundfile as sf

from clap_core.audio import codec as aio
from clap_core.audio.codec import TARGET_SR, AudioDecodeError
from clap_demo.audio_files import encode_audio_file

TONE_HZ = 1000.0
SECONDS = 0.5
LOSSLESS = {"wav", "flac"}

# (format, source rate, channels): every format at several rates and channel counts.
FORMAT_CASES = [
    ("wav", 8000, 1), ("wav", 22050, 2), ("wav", 48000, 6),
    ("flac", 8000, 2), ("flac", 16000, 1), ("flac", 44100, 6),
    ("ogg", 16000, 1), ("ogg", 44100, 2), ("ogg", 22050, 6),
    ("mp3", 8000, 1), ("mp3", 22050, 2), ("mp3", 44100, 2), ("mp3", 48000, 1),
    ("m4a", 16000, 1), ("m4a", 44100, 2), ("m4a", 48000, 6),
    ("mp4", 22050, 2),
    ("opus", 16000, 1), ("opus", 48000, 6),
    ("webm", 44100, 2), ("webm", 8000, 1),
    ("webm_vorbis", 22050, 2),
]


def sine(freq: float, sr: int, seconds: float, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    """(C, N) float32 sine, identical in every channel."""
    t = np.arange(int(round(sr * seconds))) / sr
    return np.tile(amp * np.sin(2 * np.pi * freq * t), (channels, 1)).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    """Frequency of the largest FFT magnitude of a 1-D signal."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


def video_mp4(with_audio: bool) -> bytes:
    """A tiny mp4 with a few video frames and optionally a 0.5 s stereo AAC track."""
    codec = next(c for c in ("libx264", "mpeg4", "mjpeg") if c in av.codecs_available)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        video = out.add_stream(codec, rate=10)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = out.add_stream("aac", rate=44100, layout="stereo") if with_audio else None
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if audio is not None:
            frame = av.AudioFrame.from_ndarray(sine(TONE_HZ, 44100, SECONDS, 2), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 44100, 0
            for packet in list(audio.encode(frame)) + list(audio.encode(None)):
                out.mux(packet)
    return buf.getvalue()


def wav_bytes(wave: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave.T, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# formats, rates, channels


@pytest.mark.parametrize("fmt,sr,channels", FORMAT_CASES)
def test_every_format_decodes_to_48k_with_length_and_pitch_preserved(fmt, sr, channels):
    data = encode_audio_file(sine(TONE_HZ, sr, SECONDS, channels), sr, fmt)
    wave, out_sr = aio.decode_audio(data, mono=False)

    assert out_sr == TARGET_SR and wave.dtype == np.float32
    assert wave.shape[0] == channels
    expected = SECONDS * TARGET_SR
    # lossy codecs add encoder priming / frame padding: allow up to 2 codec frames (<= 2048 samples at sr)
    tolerance = 2 if fmt in LOSSLESS else 2048 / sr * TARGET_SR
    assert abs(wave.shape[1] - expected) <= tolerance
    bin_hz = TARGET_SR / wave.shape[1]
    assert abs(peak_hz(wave[0], TARGET_SR) - TONE_HZ) <= 2 * bin_hz


@pytest.mark.parametrize("fmt", ["wav", "mp3", "m4a"])
def test_path_and_bytes_sources_decode_identically(tmp_path, fmt):
    data = encode_audio_file(sine(TONE_HZ, 22050, SECONDS, 2), 22050, fmt)
    path = tmp_path / f"clip.{fmt}"
    path.write_bytes(data)

    from_path, _ = aio.decode_audio(path)
    from_str, _ = aio.decode_audio(str(path))
    from_bytes, _ = aio.decode_audio(data)

    assert from_path.shape[0] == 1
    np.testing.assert_array_equal(from_path, from_bytes)
    np.testing.assert_array_equal(from_str, from_bytes)


def test_native_rate_is_kept_when_target_sr_is_none():
    wave = sine(TONE_HZ, 22050, SECONDS, 2)
    decoded, sr = aio.decode_audio(wav_bytes(wave, 22050, "FLOAT"), mono=False, target_sr=None)
    assert sr == 22050
    np.testing.assert_array_equal(decoded, wave)


def test_mp4_with_video_and_audio_decodes_the_audio_track():
    data = video_mp4(with_audio=True)
    wave, sr = aio.decode_audio(data, mono=False)
    assert sr == TARGET_SR and wave.shape[0] == 2
    assert abs(wave.shape[1] - SECONDS * TARGET_SR) <= 2048 / 44100 * TARGET_SR
    assert abs(peak_hz(wave[0], TARGET_SR) - TONE_HZ) <= 2 * TARGET_SR / wave.shape[1]
    assert aio.probe_duration(data) == pytest.approx(SECONDS, abs=0.1)


# -----------------------------------------------------------------------------
# resample / downmix


def test_resample_keeps_tone_and_rejects_images():
    sr_in, freq = 8000, 3000.0
    wave = sine(freq, sr_in, 1.0)
    out = aio.resample(wave, sr_in, TARGET_SR)  # (1, 48000)

    assert out.dtype == np.float32 and out.shape == (1, TARGET_SR)
    spectrum = np.abs(np.fft.rfft(out[0] * np.hanning(out.shape[1])))
    assert abs(np.argmax(spectrum) - freq) <= 1  # 1 Hz bins
    image_hz = sr_in - freq  # where a poor interpolator leaves a mirror of the tone
    image_db = 20 * np.log10(spectrum[int(image_hz) - 5 : int(image_hz) + 6].max() / spectrum.max())
    assert image_db < -80


def test_resample_is_a_noop_for_equal_rates():
    wave = sine(TONE_HZ, 16000, 0.1, 2)
    np.testing.assert_array_equal(aio.resample(wave, 16000, 16000), wave)


def test_downmix_is_the_channel_mean():
    rng = np.random.default_rng(0)
    wave = rng.uniform(-0.5, 0.5, size=(6, 1000)).astype(np.float32)
    mixed = aio.downmix(wave)
    assert mixed.shape == (1, 1000)
    np.testing.assert_allclose(mixed[0], wave.mean(axis=0), rtol=0, atol=1e-7)


def test_decode_mono_equals_mean_of_decoded_channels():
    left, right = sine(440.0, 16000, SECONDS)[0], sine(1300.0, 16000, SECONDS)[0]
    data = wav_bytes(np.stack([left, right]), 16000, "FLOAT")
    stereo, _ = aio.decode_audio(data, mono=False, target_sr=None)
    mono, _ = aio.decode_audio(data, mono=True, target_sr=None)
    np.testing.assert_array_equal(mono, aio.downmix(stereo))
    mono_48k, _ = aio.decode_audio(data, mono=True)
    stereo_48k, _ = aio.decode_audio(data, mono=False)
    np.testing.assert_allclose(mono_48k, stereo_48k.mean(axis=0, keepdims=True), atol=1e-6)


# -----------------------------------------------------------------------------
# bad inputs


def flac_header_only() -> bytes:
    """A FLAC file cut right after its metadata: the header parses, no frame is complete."""
    return aio.encode_flac(sine(TONE_HZ, 16000, 1.0), 16000)[:100]


BAD_BYTES = {
    "empty_file": lambda: b"",
    "undecodable": lambda: np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "truncated": lambda: encode_audio_file(sine(TONE_HZ, 16000, 1.0), 16000, "ogg")[:30],
    "decode_failed": flac_header_only,
    "no_samples": lambda: wav_bytes(sine(TONE_HZ, 16000, 1.0), 16000)[:44],
    "no_audio_stream": lambda: video_mp4(with_audio=False),
    "nan_or_inf": lambda: wav_bytes(np.array([[0.1, np.nan, 0.2] * 100], np.float32), 16000, "FLOAT"),
}


@pytest.mark.parametrize("reason", sorted(BAD_BYTES))
def test_bad_bytes_raise_their_reason(reason):
    with pytest.raises(AudioDecodeError) as info:
        aio.decode_audio(BAD_BYTES[reason]())
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("reason", ["empty_file", "undecodable", "decode_failed", "nan_or_inf"])
def test_bad_files_with_audio_extensions_raise_their_reason(tmp_path, reason):
    path = tmp_path / "clip.wav"
    path.write_bytes(BAD_BYTES[reason]())
    with pytest.raises(AudioDecodeError) as info:
        aio.decode_audio(path)
    assert info.value.reason == reason


def test_missing_file(tmp_path):
    with pytest.raises(AudioDecodeError) as info:
        aio.decode_audio(tmp_path / "nope.flac")
    assert info.value.reason == "missing_file"


def test_infinite_samples_are_rejected():
    data = wav_bytes(np.array([[0.1, np.inf, -0.1] * 100], np.float32), 16000, "FLOAT")
    with pytest.raises(AudioDecodeError) as info:
        aio.decode_audio(data, target_sr=None)
    assert info.value.reason == "nan_or_inf"


def test_huge_finite_samples_are_not_taken_for_inf_and_mono_passes_through_unchanged():
    """The finiteness check sums in float64: float32 samples near their maximum overflow a float32 sum, not
    this one, so loud-but-finite float files are kept; a mono file's samples come back as decoded."""
    wave = np.array([[3e38, 3e38, -1e38, 0.5] * 100], np.float32)  # (1, 400): sum past float32's 3.4e38
    out, sr = aio.decode_audio(wav_bytes(wave, 16000, "FLOAT"), target_sr=None)
    assert sr == 16000 and out.dtype == np.float32 and np.array_equal(out, wave)


def test_too_many_channels_is_checked_before_downmix():
    data = encode_audio_file(sine(TONE_HZ, 16000, SECONDS, 6), 16000, "flac")
    with pytest.raises(AudioDecodeError) as info:
        aio.decode_audio(data, mono=True, max_channels=2)
    assert info.value.reason == "too_many_channels"
    wave, _ = aio.decode_audio(data, mono=True, max_channels=6)
    assert wave.shape[0] == 1


def test_truncated_file_keeps_the_decodable_prefix():
    full = encode_audio_file(sine(TONE_HZ, 44100, 1.0, 2), 44100, "mp3")
    wave, _ = aio.decode_audio(full[: len(full) // 2])
    assert 0.3 * TARGET_SR < wave.shape[1] < 0.7 * TARGET_SR


# -----------------------------------------------------------------------------
# probe_duration


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3", "m4a", "webm"])
def test_probe_duration_reads_the_header(fmt):
    data = encode_audio_file(sine(TONE_HZ, 22050, 1.5, 1), 22050, fmt)
    assert aio.probe_duration(data) == pytest.approx(1.5, abs=0.1)


def test_probe_duration_is_none_when_unknown(tmp_path):
    assert aio.probe_duration(tmp_path / "missing.wav") is None
    assert aio.probe_duration(b"") is None
    assert aio.probe_duration(BAD_BYTES["undecodable"]()) is None


# -----------------------------------------------------------------------------
# FLAC storage


def test_flac_pcm24_round_trip_is_bit_exact_on_the_grid():
    rng = np.random.default_rng(0)
    steps = rng.integers(-(2**23), 2**23, size=(2, 4800))
    steps[0, :2] = [-(2**23), 2**23 - 1]  # both extremes of the 24-bit range
    wave = (steps / 2.0**23).astype(np.float32)

    decoded, sr = aio.decode_flac(aio.encode_flac(wave, TARGET_SR))
    assert sr == TARGET_SR and decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, wave)


def test_flac_pcm16_round_trip_is_bit_exact_on_the_grid():
    steps = np.random.default_rng(1).integers(-(2**15), 2**15, size=4800)
    wave = (steps / 2.0**15).astype(np.float32)
    decoded, _ = aio.decode_flac(aio.encode_flac(wave, 16000, subtype="PCM_16"))
    np.testing.assert_array_equal(decoded, wave[None, :])


def test_flac_quantization_error_is_at_most_half_a_step_and_clips():
    wave = np.random.default_rng(2).uniform(-1.0, 1.0, size=(1, 4800)).astype(np.float32)
    wave[0, :2] = [1.7, -3.0]
    decoded, _ = aio.decode_flac(aio.encode_flac(wave, TARGET_SR))
    assert np.abs(decoded[0, 2:] - wave[0, 2:]).max() <= 0.5 / 2**23 + 1e-9
    assert decoded[0, 0] == pytest.approx(1.0 - 2.0**-23) and decoded[0, 1] == -1.0


def test_flac_encoding_is_deterministic():
    wave = np.random.default_rng(3).uniform(-0.9, 0.9, size=(2, 9600)).astype(np.float32)
    first = aio.encode_flac(wave, TARGET_SR)
    assert first == aio.encode_flac(wave.copy(), TARGET_SR)
    assert first != aio.encode_flac(wave[:, ::-1].copy(), TARGET_SR)
