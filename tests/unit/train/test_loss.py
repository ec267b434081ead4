import math

import pytest
import torch
import torch.nn.functional as F

from clap_core.train.loss import (
    LOSS_KINDS,
    ClipLoss,
    LogitScale,
    SigLipLoss,
    SigmoidLogitScale,
    build_loss,
    gather_features,
)


def _features(batch=6, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    audio = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)  # (B, D)
    text = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)  # (B, D)
    return audio, text


def test_clip_loss_matches_hand_written_reference():
    audio, text = _features()
    scale = torch.tensor(14.3)
    labels = torch.arange(audio.shape[0])
    expected = (F.cross_entropy(scale * audio @ text.T, labels) + F.cross_entropy(scale * text @ audio.T, labels)) / 2
    out = ClipLoss()(audio, text, scale)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], expected)
    torch.testing.assert_close(ClipLoss()(audio, text, scale, output_dict=False), expected)


def test_clip_loss_near_zero_for_perfect_alignment():
    features = torch.eye(4)  # orthonormal: positives score 1, negatives 0
    loss = ClipLoss()(features, features.clone(), torch.tensor(100.0))["contrastive_loss"]
    assert loss.item() < 1e-6


def test_per_modality_scales_apply_to_their_direction():
    audio, text = _features(batch=5)
    scale_audio, scale_text = torch.tensor(2.0), torch.tensor(5.0)
    loss_fn = ClipLoss()
    logits_per_audio, logits_per_text = loss_fn.get_logits(audio, text, scale_audio, scale_text)
    torch.testing.assert_close(logits_per_audio, 2.0 * audio @ text.T)
    torch.testing.assert_close(logits_per_text, 5.0 * text @ audio.T)
    labels = torch.arange(5)
    expected = (F.cross_entropy(2.0 * audio @ text.T, labels) + F.cross_entropy(5.0 * text @ audio.T, labels)) / 2
    torch.testing.assert_close(loss_fn(audio, text, scale_audio, scale_text)["contrastive_loss"], expected)
    swapped = loss_fn(audio, text, scale_text, scale_audio)["contrastive_loss"]
    assert not torch.allclose(swapped, expected)


def test_ground_truth_offsets_by_rank_in_local_mode_and_is_cached():
    loss_fn = ClipLoss(local_loss=True, rank=2, world_size=4)
    labels = loss_fn.get_ground_truth(torch.device("cpu"), 3)
    assert labels.tolist() == [6, 7, 8]
    assert loss_fn.get_ground_truth(torch.device("cpu"), 3) is labels
    assert loss_fn.get_ground_truth(torch.device("cpu"), 2).tolist() == [4, 5]
    assert ClipLoss(rank=2, world_size=4).get_ground_truth(torch.device("cpu"), 3).tolist() == [0, 1, 2]


def test_gather_features_is_identity_for_single_process():
    audio, text = _features()
    all_audio, all_text = gather_features(audio, text, gather_with_grad=True, rank=0, world_size=1)
    assert all_audio is audio and all_text is text


def test_logit_scale_init_and_clamp():
    module = LogitScale()
    scale_audio, scale_text = module()
    assert scale_audio.item() == pytest.approx(1 / 0.07)
    assert scale_text.item() == pytest.approx(1 / 0.07)
    assert module.log_scale.numel() == 1

    with torch.no_grad():
        module.log_scale.fill_(math.log(1000.0))
    scale_audio, _ = module()
    assert scale_audio.item() == pytest.approx(100.0)
    scale_audio.backward()
    assert module.log_scale.grad.abs().sum().item() == 0.0  # clamped: no push further up
    module.clamp_()
    assert module.log_scale.item() == pytest.approx(math.log(100.0))


def test_per_modality_logit_scale_has_independent_gradients():
    module = LogitScale(init_temperature=0.1, per_modality=True)
    assert module.log_scale.shape == (2,)
    with torch.no_grad():
        module.log_scale[1] = math.log(20.0)
    scale_audio, scale_text = module()
    assert scale_audio.item() == pytest.approx(10.0)
    assert scale_text.item() == pytest.approx(20.0)
    (scale_audio + 3 * scale_text).backward()
    # d exp(x)/dx = exp(x)
    torch.testing.assert_close(module.log_scale.grad, torch.tensor([10.0, 60.0]))


def test_sigmoid_logit_scale_init():
    scale, bias = SigmoidLogitScale()()
    assert scale.item() == pytest.approx(10.0)
    assert bias.item() == pytest.approx(-10.0)


def test_siglip_loss_matches_double_loop():
    audio, text = _features(batch=4, dim=5, seed=3)
    scale, bias = torch.tensor(7.0), torch.tensor(-3.0)
    total = torch.tensor(0.0)
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * torch.dot(audio[i], text[j]) + bias)))
    out = SigLipLoss()(audio, text, scale, bias)
    assert set(out) == {"sigmoid_loss"}
    torch.testing.assert_close(out["sigmoid_loss"], total / 4)


def test_build_loss_is_the_pretraining_loss_of_each_kind():
    """The one loss builder (pretraining and tests): InfoNCE gathers with gradient, SigLIP scores local rows."""
    clip = build_loss("infonce", local_loss=True, rank=2, world_size=4)
    assert isinstance(clip, ClipLoss)
    assert (clip.local_loss, clip.gather_with_grad, clip.rank, clip.world_size) == (True, True, 2, 4)
    assert build_loss("infonce", local_loss=False).local_loss is False
    siglip = build_loss("siglip", local_loss=False, rank=1, world_size=2)
    assert isinstance(siglip, SigLipLoss) and (siglip.rank, siglip.world_size) == (1, 2)
    assert LOSS_KINDS == ("infonce", "siglip")
    with pytest.raises(ValueError, match="'nope'.*infonce, siglip"):
        build_loss("nope")


def test_built_infonce_loss_uses_both_temperatures():
    """per-modality temperatures: the built loss applies the audio scale to a->t and the text scale to t->a."""
    audio, text = _features(batch=5)
    labels = torch.arange(5)
    expected = (F.cross_entropy(2.0 * audio @ text.T, labels) + F.cross_entropy(5.0 * text @ audio.T, labels)) / 2
    loss = build_loss("infonce")(audio, text, torch.tensor(2.0), torch.tensor(5.0), output_dict=False)
    torch.testing.assert_close(loss, expected)
