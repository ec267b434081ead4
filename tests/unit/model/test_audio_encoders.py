"""Behaviour of the audio encoders: log-mel (B, 1, T, F) -> (B, out_dim)."""

import math

import pytest
import torch

from clap_core.model.encoders.cnn14 import Cnn14
from clap_core.model.encoders.conv import TinyConvEncoder
from clap_core.model.encoders.perceiver import PerceiverAudioEncoder

N_MELS = 64
TINY_PERCEIVER = dict(conv_channels=32, num_latents=8, latent_dim=32, self_heads=4, self_layers=2, mlp_ratio=2)

ENCODERS = {
    "cnn14": lambda: Cnn14(channels=(4, 8, 8, 16, 16, 32), embed_dim=24),
    "perceiver": lambda: PerceiverAudioEncoder(**TINY_PERCEIVER),
    "tiny": lambda: TinyConvEncoder(),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    return ENCODERS[name]()


def mel(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, T, N_MELS, generator=g)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("T", [101, 301, 1001])
def test_output_shape(name, T):
    model = make(name).eval()
    with torch.no_grad():
        out = model(mel(3, T))
    assert out.shape == (3, model.out_dim)
    assert torch.isfinite(out).all()


def test_out_dim_rules():
    assert Cnn14(channels=(4, 8, 8, 16, 16, 32), embed_dim=24).out_dim == 24
    assert PerceiverAudioEncoder(**TINY_PERCEIVER).out_dim == 2 * TINY_PERCEIVER["latent_dim"]
    assert TinyConvEncoder(embed_dim=40).out_dim == 40


@pytest.mark.parametrize("name,min_frames", [("cnn14", 32), ("perceiver", 1), ("tiny", 8)])
def test_minimum_frames(name, min_frames):
    model = make(name).eval()
    assert model.min_frames == min_frames
    with torch.no_grad():
        assert model(mel(2, min_frames)).shape == (2, model.out_dim)
        if min_frames > 1:
            with pytest.raises(ValueError):
                model(mel(2, min_frames - 1))


def test_perceiver_default_config_shape():
    model = PerceiverAudioEncoder().eval()
    with torch.no_grad():
        assert model(mel(2, 1001)).shape == (2, 512)


def test_perceiver_rejects_clips_longer_than_max_frames():
    model = PerceiverAudioEncoder(**TINY_PERCEIVER, max_frames=400).eval()
    with torch.no_grad():
        model(mel(1, 400))
        with pytest.raises(ValueError):
            model(mel(1, 401))


def test_cnn14_default_parameter_count():
    # CNN14 without its 527-way fc_audioset head; convs have no bias, BN has weight + bias:
    #   bn0 2*64 + sum over blocks (9*c_in*c_out + 9*c_out*c_out + 4*c_out) + fc1 2048*2048 + 2048
    #   = 79,673,792; adding fc_audioset (2048*527 + 527) gives the published 80,753,615 (80.8M).
    chans = [1, 64, 128, 256, 512, 1024, 2048]
    blocks = sum(9 * i * o + 9 * o * o + 4 * o for i, o in zip(chans, chans[1:]))
    expected = 2 * 64 + blocks + 2048 * 2048 + 2048
    assert expected == 79_673_792
    assert expected + 2048 * 527 + 527 == 80_753_615
    with torch.device("meta"):  # no memory or init time for 80M weights
        model = Cnn14()
    assert n_params(model) == expected
    assert model.out_dim == 2048


def test_tiny_conv_parameter_count():
    assert n_params(TinyConvEncoder()) < 100_000


@pytest.mark.parametrize("T", [1, 101, 301, 1001])
def test_perceiver_latent_cost_independent_of_length(T):
    model = make("perceiver").eval()
    n, d = TINY_PERCEIVER["num_latents"], TINY_PERCEIVER["latent_dim"]
    seen = []  # (query shape, key shape) of every attention call
    for attn in [model.cross.attn] + [layer.attn for layer in model.layers]:
        attn.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, args[1].shape, out.shape)))
    with torch.no_grad():
        assert model.cross_attend(mel(2, T)).shape == (2, n, d)
        model(mel(2, T))
    cross, self_attn = seen[-3], seen[-2:]
    # cross-attention: N latents query L = ceil(T / 4) conv frames, so cost ~ N * T
    assert cross == ((2, n, d), (2, math.ceil(T / 4), TINY_PERCEIVER["conv_channels"]), (2, n, d))
    # self-attention: N latents attend to N latents, whatever T is
    assert all(s == ((2, n, d), (2, n, d), (2, n, d)) for s in self_attn)


@pytest.mark.parametrize("T,pad", [(301, 100), (300, 37), (1, 50), (257, 3)])
def test_perceiver_padding_invariance(T, pad):
    # padded frames hold large junk: zeroing them before each conv and masking the conv
    # outputs centred on them makes the padded clip compute exactly what the short one does
    model = make("perceiver").eval()
    clip = mel(1, T)
    padded = torch.cat([clip, 100 * mel(1, pad, seed=2)], dim=2)
    frame_mask = torch.arange(T + pad)[None] < T  # (1, T + pad)
    with torch.no_grad():
        alone = model(clip)
        masked = model(padded, frame_mask)
        unmasked = model(padded)
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def test_perceiver_mixed_length_batch():
    model = make("perceiver").eval()
    short, long = mel(1, 301), mel(1, 1001, seed=3)
    batch = torch.cat([torch.cat([short, torch.zeros(1, 1, 700, N_MELS)], dim=2), long])  # (2, 1, 1001, F)
    frame_mask = torch.arange(1001)[None] < torch.tensor([[301], [1001]])  # (2, 1001)
    with torch.no_grad():
        out = model(batch, frame_mask)
        torch.testing.assert_close(out[0], model(short)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1], model(long)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ENCODERS)
def test_batch_independence_in_eval(name):
    model = make(name).eval()
    batch = mel(4, 301)
    with torch.no_grad():
        together = model(batch)
        for i in range(4):
            torch.testing.assert_close(together[i], model(batch[i : i + 1])[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ENCODERS)
def test_gradients_reach_every_parameter(name):
    model = make(name).train()
    out = model(mel(3, 101))
    # random weights: a plain sum would cancel through LayerNorm/BN and hide real gradients
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ENCODERS)
def test_determinism_under_fixed_seed(name):
    outs = []
    for _ in range(2):
        model = make(name, seed=7).train()  # train mode: dropout must follow the seed too
        torch.manual_seed(11)
        outs.append(model(mel(2, 101)))
    assert torch.equal(outs[0], outs[1])
    other = make(name, seed=8).train()
    torch.manual_seed(11)
    assert not torch.equal(outs[0], other(mel(2, 101)))
