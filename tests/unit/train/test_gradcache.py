"""Gradient cache == plain full-batch step: same parameter gradients (1e-5) on the `tiny` model."""
from __future__ import annotations

import pytest
import torch

from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.train.gradcache import BatchNormRunningStats, forward, grad_cache_step, plain_step
from clap_core.train.loss import ClipLoss, SigLipLoss

BATCH = 12


def make_batch(model: ClapModel, batch: int = BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clip = model.frontend.clip_samples
    lengths = torch.randint(clip // 2, clip + clip // 2, (batch,), generator=g)  # short (repeat-pad) and long (crop)
    waves = torch.zeros(batch, int(lengths.max()))
    for i, n in enumerate(lengths):
        waves[i, :n] = torch.randn(int(n), generator=g) * 0.1
    tokens = model.tokenize([f"sound number {i} with {'low' if i % 2 else 'high'} pitch" for i in range(batch)])
    return {"waves": waves, "lengths": lengths, **tokens}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def build(overrides: list[str] | None = None, loss: str = "infonce") -> ClapModel:
    torch.manual_seed(0)
    model = ClapModel(get_model_config("tiny", [f"loss={loss}", *(overrides or [])])).train()
    # Give BatchNorm non-trivial running statistics (log-mel in dB is far from N(0, 1)).
    with torch.no_grad():
        forward(model, make_batch(model, seed=99))
    return model


def reference_step(model: ClapModel, loss_fn, batch, seed: int) -> tuple[torch.Tensor, dict]:
    """Plain full-batch step with BatchNorm on running statistics, as the gradient cache uses them."""
    model.zero_grad(set_to_none=True)
    layers = BatchNormRunningStats(model).layers
    for layer in layers:
        layer.eval()
    torch.manual_seed(seed)
    loss = plain_step(model, loss_fn, batch, torch.Tensor.backward)
    for layer in layers:
        layer.train()
    return loss, grads(model)


def cached_step(model: ClapModel, loss_fn, batch, chunk: int, seed: int) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = grad_cache_step(model, loss_fn, batch, chunk, torch.Tensor.backward)
    return loss, grads(model)


def assert_same_grads(ref: dict, got: dict) -> None:
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss,loss_fn", [("infonce", ClipLoss()), ("siglip", SigLipLoss())])
@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_grad_cache_equals_full_batch(loss, loss_fn, chunk):
    """Uneven chunks (5 of 12) included; the temperature (and SigLIP bias) get their gradient too."""
    model = build(loss=loss)
    batch = make_batch(model)
    ref_loss, ref = reference_step(model, loss_fn, batch, seed=1)
    got_loss, got = cached_step(model, loss_fn, batch, chunk, seed=1)
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert any(n.startswith("logit_scale") for n in got)
    assert_same_grads(ref, got)


def test_grad_cache_replays_dropout_and_crops():
    """With dropout and random crops, each chunk's re-run draws the same randomness as its first pass:
    the gradients equal autograd through the chunk-by-chunk forward with graph (same RNG consumption)."""
    model = build(["text_encoder.hf_config.hidden_dropout_prob=0.3"])
    batch = make_batch(model)
    loss_fn = ClipLoss()
    chunk = 4

    model.zero_grad(set_to_none=True)
    for layer in BatchNormRunningStats(model).layers:
        layer.eval()
    torch.manual_seed(3)
    outs = [forward(model, {k: v[i:i + chunk] for k, v in batch.items()}) for i in range(0, BATCH, chunk)]
    audio = torch.cat([o["audio_embeds"] for o in outs])
    text = torch.cat([o["text_embeds"] for o in outs])
    ClipLoss()(audio, text, outs[0]["logit_scale"], outs[0]["logit_scale_text"], output_dict=False).backward()
    for layer in BatchNormRunningStats(model).layers:
        layer.train()
    ref = grads(model)

    _, got = cached_step(model, loss_fn, batch, chunk, seed=3)
    assert_same_grads(ref, got)


def test_grad_cache_updates_batchnorm_like_one_full_batch_forward():
    """The first BatchNorm sees the same inputs either way, so its running statistics must match those of one
    train-mode forward of the whole batch; deeper layers (inputs normalised differently) must still move."""
    model = build()
    before = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    batch = make_batch(model)
    twin = build()
    with torch.no_grad():
        torch.manual_seed(5)
        forward(twin, batch)  # train mode: one running-stat update from the whole batch
    torch.manual_seed(5)
    grad_cache_step(model, ClipLoss(), batch, 4, torch.Tensor.backward)
    got, want = dict(model.named_buffers()), dict(twin.named_buffers())
    for name in ("audio_encoder.bn0.running_mean", "audio_encoder.bn0.running_var"):
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-5)
    assert all(not torch.equal(got[n], b) for n, b in before.items())
    assert int(got["audio_encoder.bn0.num_batches_tracked"]) == int(want["audio_encoder.bn0.num_batches_tracked"])
    assert all(m.training for m in model.modules())
