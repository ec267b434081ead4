"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

    groups = param_groups(model, lr=5e-4, lr_pretrained=1e-5, weight_decay=0.2)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)
    scheduler = warmup_cosine(optimizer, warmup_steps=100, total_steps=10_000)

Weight decay pulls weights towards zero; on gains, shifts and the temperature that is only a bias
with no regularising value (CLIP, open_clip), so those parameters get none. Encoders loaded from a
pretrained checkpoint get their own (usually smaller) learning rate, so the new heads can move fast
without wrecking what the encoders already know.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
NO_DECAY_PREFIXES = ("logit_scale.",)


def pretrained_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the encoders that start from pretrained weights."""
    text_cfg, audio_cfg = model.config.text_encoder, model.config.audio_encoder
    prefixes = ("text_encoder.",) if text_cfg.pretrained else ()
    if getattr(audio_cfg, "pretrained", None):  # a speech tower's transformers backbone; its pooling is new
        prefixes += (f"audio_encoder.{model.audio_encoder.backbone_name}.",)
    return prefixes


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases and other 1-D tensors, every parameter of a norm layer, and the temperature."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if param.ndim < 2 or isinstance(module, NORM_TYPES) or full.startswith(NO_DECAY_PREFIXES):
                names.add(full)
    return names


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_pretrained: float | None = None,
                 pretrained: tuple[str, ...] | None = None) -> list[dict]:
    """Trainable parameters split by (pretrained or new) x (decay or not); empty groups are dropped."""
    pretrained = pretrained_prefixes(model) if pretrained is None else pretrained
    skip_decay = no_decay_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen encoders (MS-CLAP 2023 text encoder) take no optimizer state
            continue
        key = (name.startswith(pretrained), name not in skip_decay)
        groups.setdefault(key, []).append(param)
    return [{"name": f"{'pretrained' if is_pre else 'new'}_{'decay' if decay else 'no_decay'}",
             "params": params,
             "lr": (lr_pretrained if lr_pretrained is not None else lr) if is_pre else lr,
             "weight_decay": weight_decay if decay else 0.0}
            for (is_pre, decay), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, lr_pretrained: float | None = None,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6) -> torch.optim.AdamW:
    # fused: one vectorised kernel per parameter group on CPU and GPU. The same AdamW update, within float
    # rounding of the per-parameter loop (tests/unit/train/test_optim.py); on CPU it takes HTS-AT + RoBERTa's
    # step from ~0.28 s to ~0.05 s (README, "Train step next to LAION-CLAP").
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, lr_pretrained), lr=lr, betas=betas, eps=eps,
                             **adamw_kernel(next(model.parameters()).device))


def adamw_kernel(device: torch.device) -> dict:
    """AdamW's implementation on `device`: the fused kernel where torch has one (CPU, CUDA), else its default."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier for the step about to be taken (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio))
