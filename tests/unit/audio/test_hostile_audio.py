"""Hostile audio: memory never follows a header or a file's length, signal checks per segment, float
audio past full scale, and paths that are not regular files."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clap_core.audio import codec as aio
from clap_core.audio.codec import AudioDecodeError
from clap_core.data.input_rows import new_row
from clap_core.preprocess.config import load_preprocess_config
from clap_core.preprocess.plan import plan_units
from clap_core.preprocess.unit import process_row
from clap_demo.audio_files import encode_audio_file
from tests.fixtures.hostile import float_wav, lying_flac, tone, write_long_flac

REPO = Path(__file__).resolve().parents[3]


def run_row(path: Path, *overrides: str) -> tuple[list, list]:
    cfg = load_preprocess_config(None, list(overrides))
    plan = plan_units([new_row(0, path.name, str(path), ["a caption"], id="c")], cfg)
    return process_row(plan.units[0].rows[0], cfg)


# -----------------------------------------------------------------------------
# memory


def test_lying_header_never_allocates_what_it_declares():
    data = lying_flac()  # declares 2^36 - 1 frames (256 GiB as float32), holds 1 s
    assert len(data) < 24_000
    wave, sr = aio.decode_audio(data)  # the old sf.read allocated from the header: MemoryError
    assert sr == 48000 and wave.shape == (1, 48000)
    with pytest.raises(AudioDecodeError) as info:
        aio.decode_audio(data, max_seconds=30.0)
    assert info.value.reason == "too_long" and "header declares" in info.value.message


def test_lying_header_in_preprocessing_is_too_long_before_decoding(tmp_path):
    path = tmp_path / "lying.flac"
    path.write_bytes(lying_flac())
    rows, rejects = run_row(path)
    assert rows == [] and [(r["stage"], r["reason"]) for r in rejects] == [("validate", "too_long")]


def test_decoding_stops_at_max_seconds_whatever_the_header_says():
    """A stream that never ends and declares no length: decoding stops right after max_seconds."""
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield np.full((1, 1000), 0.1, np.float32)

    native = aio.NativeStream(sample_rate=1000, channels=1, declared_seconds=None, blocks=endless())
    with pytest.raises(AudioDecodeError) as info:
        list(aio.checked_blocks(native, mono=True, out_sr=1000, max_seconds=5.0))
    assert info.value.reason == "too_long" and len(pulled) == 6


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from clap_core.data.input_rows import new_row
    from clap_core.preprocess.plan import plan_units
    from clap_core.preprocess.unit import process_unit
    from clap_core.preprocess.config import load_preprocess_config

    def run(path, out):
        cfg = load_preprocess_config(None, ["audio.max_seconds=10.0", "output.shard_mb=4"])
        plan = plan_units([new_row(0, Path(path).name, path, ["a tone"], id="c")], cfg)
        return process_unit(plan.units[0], cfg, out)

    run(sys.argv[1], sys.argv[3] + "/short")  # warm-up: imports, codec and resampler setup
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    marker = run(sys.argv[2], sys.argv[3] + "/long")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(json.dumps({"grown_mb": grown / 1024, "rows": marker.rows_out, "rejects": marker.rejects.to_dict()}))
""")


def test_worker_peak_memory_is_flat_in_file_length(tmp_path):
    """A 20-minute file (230 MB as float32; the old decoder grew the worker by 434 MB) is decoded, cut,
    checked and written by a unit with a peak RSS growth of a few MB over a 30 s clip."""
    short = write_long_flac(tmp_path / "short.flac", 30.0, tone_seconds=20.0)
    long = write_long_flac(tmp_path / "long.flac", 20 * 60.0, tone_seconds=20.0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(short), str(long), str(tmp_path)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\npeak RSS growth for a 20 min clip: {result['grown_mb']:.1f} MB")
    assert result["rows"] == 2  # the 20 s tone: two 10 s segments; 118 silent segments dropped
    assert result["rejects"]["rows"] == 0 and result["rejects"]["segments_by_reason"] == {"silent_segment": 118}
    assert result["grown_mb"] < 60


# -----------------------------------------------------------------------------
# signal checks per segment, full scale


def test_silence_is_checked_on_every_segment(tmp_path):
    path = write_long_flac(tmp_path / "tone_then_silence.flac", 5.0, sr=16000, tone_seconds=1.2)
    rows, rejects = run_row(path, "audio.max_seconds=1.0", "audio.min_seconds=0.2")
    assert [r["id"] for r in rows] == ["c#seg0", "c#seg1"]  # the segments holding the tone
    assert [(r["id"], r["stage"], r["reason"]) for r in rejects] == [
        ("c#seg2", "segment", "silent_segment"), ("c#seg3", "segment", "silent_segment"),
        ("c#seg4", "segment", "silent_segment")]
    rows, rejects = run_row(path, "audio.max_seconds=1.0", "audio.min_seconds=0.2", "audio.silence=keep")
    assert len(rows) == 5 and rejects == []


def test_all_silent_segments_reject_the_row(tmp_path):
    path = write_long_flac(tmp_path / "silence.flac", 3.0, sr=16000, tone_seconds=0.0)
    rows, rejects = run_row(path, "audio.max_seconds=1.0", "audio.min_seconds=0.2")
    assert rows == [] and [(r["id"], r["reason"]) for r in rejects] == [("c", "silent")]


def test_float_audio_past_full_scale_is_normalised_and_recorded(tmp_path):
    path = tmp_path / "loud.wav"
    path.write_bytes(float_wav(2.0))
    rows, rejects = run_row(path)
    assert rejects == [] and len(rows) == 1
    wave, _ = aio.decode_flac(rows[0]["audio"])
    clipped = np.mean(np.abs(wave) >= 0.999)
    assert clipped < 0.05  # a full-scale sine spends ~3% above 0.999; the old path clipped 2/3 of the samples
    assert 0.99 < np.abs(wave).max() <= 1.0
    record = json.loads(rows[0]["augment"])["normalized"]
    assert record["source_peak"] == pytest.approx(2.0, abs=0.01) and record["gain"] == pytest.approx(0.5, abs=0.01)
    rows, rejects = run_row(path, "audio.over_full_scale=reject")
    assert rows == [] and rejects[0]["reason"] == "over_full_scale"


def test_audio_within_full_scale_is_not_touched(tmp_path):
    path = tmp_path / "ok.wav"
    path.write_bytes(float_wav(0.9))
    rows, _ = run_row(path)
    assert "normalized" not in json.loads(rows[0]["augment"])


# -----------------------------------------------------------------------------
# paths that are not regular files


@pytest.mark.parametrize("kind,reason", [("dir", "is_directory"), ("fifo", "fifo"), ("loop", "symlink_loop"),
                                         ("device", "device")])
def test_non_regular_paths_are_rejected_without_opening(tmp_path, kind, reason):
    path = tmp_path / "clip.wav"
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it would block forever
    elif kind == "loop":
        os.symlink(path.name, path)
    else:
        path = Path("/dev/zero")  # endless
    with pytest.raises(AudioDecodeError) as info:
        aio.decode_audio(path)
    assert info.value.reason == reason
    rows, rejects = run_row(path)
    assert rows == [] and rejects[0]["reason"] == reason


def test_streamed_resampling_matches_one_shot_resampling():
    """Blocks are resampled by one stateful resampler: same length and samples as resampling the whole clip."""
    wave = tone(10.0, 16000)[None]  # 160000 frames: several decode blocks
    streamed, _ = aio.decode_audio(encode_audio_file(wave, 16000, "flac"))
    whole = aio.resample(aio.decode_audio(encode_audio_file(wave, 16000, "flac"), target_sr=None)[0], 16000, 48000)
    assert streamed.shape == whole.shape == (1, 480000)
    np.testing.assert_allclose(streamed, whole, atol=1e-4)
