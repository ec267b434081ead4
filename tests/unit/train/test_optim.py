"""Parameter groups (decay, learning rates, frozen encoders) and the warmup + cosine schedule."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from clap_core.config import ConfigError
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.train.config import load_pretrain_config, resolve_model_config
from clap_core.train.optim import build_optimizer, param_groups, warmup_cosine, warmup_cosine_factor


@pytest.fixture(scope="module")
def model() -> ClapModel:
    return ClapModel(get_model_config("tiny"))


def names_of(model: torch.nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_weight_decay_on_norms_biases_and_temperature(model):
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1)}
    assert set(groups) == {"new_decay", "new_no_decay"}
    no_decay = names_of(model, groups["new_no_decay"])
    decay = names_of(model, groups["new_decay"])
    assert groups["new_no_decay"]["weight_decay"] == 0.0 and groups["new_decay"]["weight_decay"] == 0.1
    assert "logit_scale.log_scale" in no_decay
    assert "audio_encoder.bn0.weight" in no_decay and "audio_encoder.fc.bias" in no_decay
    assert any("LayerNorm" in n for n in no_decay)  # the text transformer's norms
    assert "audio_encoder.fc.weight" in decay and "text_projection.linear1.weight" in decay
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decay)
    assert decay | no_decay == {n for n, _ in model.named_parameters()}  # every trainable parameter, once


def test_pretrained_encoders_get_their_own_learning_rate(model):
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1, lr_pretrained=1e-5,
                                                 pretrained=("text_encoder.",))}
    assert set(groups) == {"new_decay", "new_no_decay", "pretrained_decay", "pretrained_no_decay"}
    assert groups["pretrained_decay"]["lr"] == groups["pretrained_no_decay"]["lr"] == 1e-5
    assert groups["new_decay"]["lr"] == 1e-3
    assert all(n.startswith("text_encoder.") for n in names_of(model, groups["pretrained_decay"]))
    assert not any(n.startswith("text_encoder.") for n in names_of(model, groups["new_decay"]))


def test_frozen_text_encoder_is_left_out():
    frozen = ClapModel(get_model_config("tiny", ["text_encoder.frozen=true"]))
    names = set().union(*(names_of(frozen, g) for g in param_groups(frozen, 1e-3, 0.1)))
    assert names and not any(n.startswith("text_encoder.") for n in names)
    assert any(n.startswith("text_projection.") for n in names)


def test_warmup_then_cosine():
    factors = [warmup_cosine_factor(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:10]))  # linear ramp
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone decay
    assert factors[110] == pytest.approx(0.1)


def test_scheduler_scales_every_group(model):
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, lr_pretrained=1e-4)
    scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=20)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-4] * len(optimizer.param_groups))
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_pretrain_config_unknown_keys_name_the_key():
    with pytest.raises(ConfigError, match="train.stepz"):
        load_pretrain_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="model.text_encoder.frozn"):
        resolve_model_config("tiny", {"text_encoder": {"frozn": True}})
    with pytest.raises(ConfigError, match="grad_cache_chunk"):
        load_pretrain_config(None, ["train.batch_size=8", "train.grad_cache_chunk=3"])
    cfg = load_pretrain_config(None, ["model.text_encoder.frozen=true"])
    assert resolve_model_config("tiny", cfg.model).text_encoder.frozen


def test_fused_adamw_takes_the_same_steps_as_the_per_parameter_loop(model):
    """build_optimizer's fused kernel is AdamW itself: after 5 steps on the same gradients, every weight equals
    the plain per-parameter loop's (torch's reference implementation) within float rounding."""
    start = {name: param.detach().clone() for name, param in model.named_parameters()}
    reference, fused_model = copy.deepcopy(model), copy.deepcopy(model)
    fused = build_optimizer(fused_model, lr=1e-2, weight_decay=0.1, lr_pretrained=1e-3)
    assert fused.param_groups and all(group["fused"] for group in fused.param_groups)
    loop = torch.optim.AdamW(param_groups(reference, lr=1e-2, weight_decay=0.1, lr_pretrained=1e-3), lr=1e-2,
                             betas=(0.9, 0.98), eps=1e-6, foreach=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for param, twin in zip(reference.parameters(), fused_model.parameters()):
            grad = torch.randn(param.shape, generator=generator)
            param.grad, twin.grad = grad, grad.clone()
        loop.step()
        fused.step()
    for (name, param), twin in zip(reference.named_parameters(), fused_model.parameters()):
        assert not torch.equal(param, start[name]), name  # every weight moved: the comparison means something
        torch.testing.assert_close(twin, param, rtol=1e-5, atol=1e-6, msg=name)
