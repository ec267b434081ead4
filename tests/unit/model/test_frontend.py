"""Audio front end: LAION log-mel, crop/pad rules, fusion views."""
import math

import torch
import torchaudio

from clap_core.model.frontend import AudioFrontend, LogMel, crop_or_pad_tensor, fusion_views, repeat_pad


def test_logmel_matches_torchaudio_reference_and_frame_count():
    wave = torch.randn(2, 48_000) * 0.1
    ours = LogMel(48_000, 1024, 480, 64, 50.0, 14_000.0)(wave)
    mel = torchaudio.transforms.MelSpectrogram(48_000, n_fft=1024, hop_length=480, f_min=50, f_max=14_000,
                                               n_mels=64, power=2.0)(wave)
    ref = 10 * torch.log10(mel.clamp(min=1e-10)).transpose(1, 2)
    assert ours.shape == (2, 101, 64)  # 1 s at 100 frames/s, centred frames
    assert torch.allclose(ours, ref, atol=1e-4)


def test_tone_lands_in_the_right_mel_bin():
    t = torch.arange(48_000) / 48_000
    low, high = (torch.sin(2 * math.pi * f * t)[None] for f in (220.0, 4000.0))
    logmel = LogMel(48_000, 1024, 480, 64, 50.0, 14_000.0)
    assert logmel(low).mean(1).argmax() < logmel(high).mean(1).argmax()


def test_repeat_pad_repeats_whole_copies_then_zero_pads():
    out = repeat_pad(torch.tensor([1.0, 2.0, 3.0]), 8)
    assert out.tolist() == [1, 2, 3, 1, 2, 3, 0, 0]


def test_crop_is_centred_in_eval_and_random_but_seeded_in_training():
    wave = torch.arange(100.0)
    assert crop_or_pad_tensor(wave, 10, "repeatpad", training=False).tolist() == list(range(45, 55))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = crop_or_pad_tensor(wave, 10, "zero", training=True, generator=g1)
    b = crop_or_pad_tensor(wave, 10, "zero", training=True, generator=g2)
    assert torch.equal(a, b) and a.tolist() == list(range(int(a[0]), int(a[0]) + 10))
    assert crop_or_pad_tensor(torch.ones(3), 5, "zero", training=False).tolist() == [1, 1, 1, 0, 0]


def test_frontend_respects_lengths_and_is_deterministic_in_eval():
    fe = AudioFrontend(clip_seconds=0.5).eval()
    waves = torch.randn(2, 48_000)
    lengths = torch.tensor([48_000, 12_000])
    mel, is_longer = fe(waves, lengths)
    assert mel.shape == (2, 1, 51, 64)
    assert is_longer.tolist() == [[True], [False]]
    # the short clip's padding ignores whatever follows its real length in the batch tensor
    alone, _ = fe(torch.cat([waves[1:, :12_000], torch.zeros(1, 36_000)], 1), torch.tensor([12_000]))
    assert torch.allclose(mel[1], alone[0])
    assert torch.equal(fe(waves, lengths)[0], mel)


def test_fusion_views_global_and_three_chunks():
    mel = torch.arange(300.0)[:, None].repeat(1, 4)  # (T=300, F=4), value = frame index
    views = fusion_views(mel, 100, training=False)
    assert views.shape == (4, 100, 4)
    starts = [int(views[i, 0, 0]) for i in (1, 2, 3)]
    assert starts == [33, 100, 167]  # middles of the three thirds of the 201 candidate starts
    assert views[0, 0, 0] < 2 and views[0, -1, 0] > 297  # global view spans the whole clip


def test_fused_frontend_repeats_short_clips_four_times():
    fe = AudioFrontend(clip_seconds=0.5, fusion=True).eval()
    mel, is_longer = fe(torch.randn(2, 48_000), torch.tensor([48_000, 10_000]))
    assert mel.shape == (2, 4, 51, 64)
    assert all(torch.equal(mel[1, 0], mel[1, i]) for i in range(4))
    assert not torch.equal(mel[0, 1], mel[0, 3])
