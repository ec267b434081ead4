"""clap_core.audio.clips: the host-side window fitting shared by batching, augmentation and inference."""
import numpy as np
import pytest

from clap_core.audio.clips import crop_or_pad, loop_to_length, split_windows


def test_crop_or_pad_centres_in_eval_draws_from_rng_in_training_and_zero_pads():
    wave = np.arange(100, dtype=np.float32)
    centre, n = crop_or_pad(wave, 10, None)
    assert n == 10 and centre.tolist() == list(range(45, 55))
    crop, n = crop_or_pad(wave, 10, np.random.default_rng(7))
    start = int(np.random.default_rng(7).integers(0, 91))  # the same draw the function makes
    assert n == 10 and crop.tolist() == list(range(start, start + 10))
    padded, n = crop_or_pad(wave[:3], 5, np.random.default_rng(0))
    assert n == 3 and padded.dtype == np.float32 and padded.tolist() == [0, 1, 2, 0, 0]


@pytest.mark.parametrize("m", [3, 7, 10, 25])
def test_loop_to_length_repeats_then_cuts_every_channel(m):
    wave = np.stack([np.arange(m), -np.arange(m)]).astype(np.float32)  # (2, m)
    out = loop_to_length(wave, 10)
    assert out.shape == (2, 10)
    assert out[0].tolist() == [i % m for i in range(10)] and out[1].tolist() == [-(i % m) for i in range(10)]


def test_split_windows_covers_the_clip_with_an_end_aligned_last_window():
    wave = np.arange(25, dtype=np.float32)
    parts = split_windows(wave, 10)
    assert [p[0] for p in parts] == [0, 10, 15] and all(len(p) == 10 for p in parts)
    assert parts[-1][-1] == 24  # the end is covered
    assert [p[0] for p in split_windows(np.arange(20.0), 10)] == [0, 10]  # exact multiple: no overlap
    short = split_windows(wave[:4], 10)
    assert len(short) == 1 and short[0].tolist() == [0, 1, 2, 3]
