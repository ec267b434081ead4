"""`deepspeed.precision=bf16` on CPU: the DeepSpeed engine trains under bf16 autocast with fp32 weights and
optimizer (the fast train step of the README's side-by-side table), in this process (tests/unit/train/conftest.py's
one-process gloo group)."""
from __future__ import annotations

import torch

from clap_core.model.clap import ClapModel
from clap_core.train.config import load_pretrain_config, resolve_model_config
from clap_core.train.engine import consolidated_state_dict, deepspeed_config, init_engine, train_step
from clap_core.train.loss import build_loss
from pipelines.job_configs import default_config_path
from tests.unit.train.test_losses_under_deepspeed import pair_batch


def engine_for(precision: str):
    cfg = load_pretrain_config(default_config_path("pretrain"), ["train.batch_size=4", "deepspeed.zero_stage=1",
                                                                 f"deepspeed.precision={precision}"])
    torch.manual_seed(0)
    model = ClapModel(resolve_model_config("tiny", cfg.model))
    return init_engine(model, cfg, use_gpu=False), build_loss(model.config.loss), cfg


def test_bf16_on_cpu_trains_under_autocast_with_fp32_weights(group):
    runs = {}
    for precision in ("fp32", "bf16"):
        engine, loss_fn, cfg = engine_for(precision)
        before = {k: v.clone() for k, v in consolidated_state_dict(engine).items()}
        batch = pair_batch(engine.module)
        torch.manual_seed(3)  # the same random crops in both runs
        losses = [train_step(engine, loss_fn, batch, cfg).item() for _ in range(2)]
        after = consolidated_state_dict(engine)
        runs[precision] = (cfg, losses, before, after)
    cfg, losses, before, after = runs["bf16"]
    assert deepspeed_config(cfg, use_gpu=False)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in deepspeed_config(runs["fp32"][0], use_gpu=False)  # auto on CPU: exact fp32
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())  # fp32 master weights
    fp32_losses = runs["fp32"][1]
    assert losses[0] != fp32_losses[0]  # bf16 really ran ...
    assert abs(losses[0] - fp32_losses[0]) < 0.02 * abs(fp32_losses[0])  # ... and scores the same batch alike
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("audio" in k for k in moved) and any("text" in k for k in moved), moved
