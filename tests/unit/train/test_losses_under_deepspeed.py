"""SigLIP and per-modality temperatures through the real DeepSpeed engine, in this process.

`model.loss=siglip` once crashed in `deepspeed.initialize` at ZeRO 2 and 3 ("self.dim() cannot be 0 to view
Float as Byte": the 0-dim scale and bias parameters). Here one DeepSpeed engine per case (tiny model, CPU, a
one-process gloo group: tests/unit/train/conftest.py) takes a few optimizer steps through `train_step`, the function every Ray Train worker
runs; the Ray Train runs of the same cases are in tests/integration/test_pretrain_losses.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from clap_core.model.clap import ClapModel
from clap_core.train.config import load_pretrain_config, resolve_model_config
from clap_core.train.engine import consolidated_state_dict, init_engine, train_step
from clap_core.train.loss import build_loss
from pipelines.job_configs import default_config_path

BATCH = 4


def engine_and_loss(overrides: list[str]):
    cfg = load_pretrain_config(default_config_path("pretrain"), [f"train.batch_size={BATCH}", *overrides])
    torch.manual_seed(0)
    model = ClapModel(resolve_model_config("tiny", cfg.model))
    return init_engine(model, cfg, use_gpu=False), build_loss(model.config.loss), cfg


def pair_batch(model: ClapModel) -> dict:
    """A PairBatchTransform-shaped batch: 4 distinct waves and captions."""
    gen = torch.Generator().manual_seed(1)
    samples = model.frontend.clip_samples
    waves = torch.randn(BATCH, samples, generator=gen) * 0.1  # (B, T)
    tokens = model.tokenize([f"sound number {i}" for i in range(BATCH)])
    return {"waves": waves, "lengths": torch.full((BATCH,), samples, dtype=torch.int64), **tokens}


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_siglip_steps_under_deepspeed_and_clamps_its_scale(group, zero_stage):
    engine, loss_fn, cfg = engine_and_loss([f"deepspeed.zero_stage={zero_stage}", "model.loss=siglip",
                                            "model.temperature.max_scale=12.0"])
    batch = pair_batch(engine.module)
    before = {k: v.clone() for k, v in consolidated_state_dict(engine).items()}
    losses = [train_step(engine, loss_fn, batch, cfg).item() for _ in range(3)]
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    after = consolidated_state_dict(engine)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("audio" in k for k in moved) and any("text" in k for k in moved), moved
    scale_key, bias_key = "logit_scale.log_scale", "logit_scale.bias"
    assert after[scale_key].shape == (1,) and after[bias_key].shape == (1,)  # never 0-dim: ZeRO flattens them
    # the shipped init (1/0.07 = 14.3) is above max_scale=12: the clamp after each step holds it at 12
    assert math.exp(after[scale_key].item()) == pytest.approx(12.0, rel=1e-4)
    assert not torch.equal(before[bias_key], after[bias_key])  # the bias is trained, not frozen


def test_per_modality_temperatures_learn_apart_under_zero_2(group):
    engine, loss_fn, cfg = engine_and_loss(["deepspeed.zero_stage=2", "model.temperature.per_modality=true",
                                            "train.lr=0.05"])
    batch = pair_batch(engine.module)
    for _ in range(3):
        train_step(engine, loss_fn, batch, cfg)
    scale_audio, scale_text = (s.item() for s in engine.module.logit_scales())
    assert scale_audio != scale_text
    weights = consolidated_state_dict(engine)
    assert weights["logit_scale.log_scale"].shape == (2,)  # one parameter: the (a2t, t2a) log-scales
    assert torch.exp(weights["logit_scale.log_scale"]).tolist() == pytest.approx([scale_audio, scale_text])
