"""SigLIP and per-modality temperatures through the real Ray Train + DeepSpeed path, and fail-fast setup errors.

SigLIP's scale and bias were 0-dim parameters, which ZeRO 2/3 cannot flatten ("self.dim() cannot be 0 to
view Float as Byte"); Ray Train then retried that deterministic error scaling.max_failures times.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray.train

from clap_core.config import ConfigError
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.train.config import load_pretrain_config
from pipelines.pretrain import DEFAULT_CONFIG, SetupError, pretrain
from tests.fixtures.shards import write_shards

pytestmark = pytest.mark.integration

FAST = ["scaling.num_workers=2", "scaling.resources_per_worker={CPU: 1}", "scaling.max_failures=0",
        "train.batch_size=4", "train.steps=3", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
        "train.checkpoint_every=3", "data.decode_tasks=1", "data.decode_batch_size=8", "data.shuffle_buffer=0",
        "data.min_epoch_rows=32"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loss_shards")
    write_shards(root, per_label=4, split="train")
    write_shards(root, per_label=1, split="valid")
    return root


def run(shards: Path, out: Path, overrides: list[str]) -> dict:
    cfg = load_pretrain_config(DEFAULT_CONFIG, FAST + overrides)
    pretrain(str(shards), str(out), "tiny", cfg)
    return json.loads((out / "metrics.json").read_text())


# The losses themselves run through the DeepSpeed engine (ZeRO 0/2/3) in CI's unit tier
# (tests/unit/train/test_losses_under_deepspeed.py) and Ray Train around them is the same for every loss: the two
# runs through Ray Train (~40 s each on 2 cores) are in the slow tier, for CI's budget.
@pytest.mark.slow
def test_siglip_trains_under_deepspeed(ray_local, shards, tmp_path):
    """ZeRO-2 through Ray Train (ZeRO 0, 2 and 3 through the DeepSpeed engine in one process:
    tests/unit/train/test_losses_under_deepspeed.py)."""
    metrics = run(shards, tmp_path / "run", ["deepspeed.zero_stage=2", "model.loss=siglip",
                                             "model.temperature.max_scale=12.0"])
    assert metrics["step"] == 3 and [h["step"] for h in metrics["history"]] == [1, 2, 3]
    assert all(h["loss"] > 0 and h["loss"] == h["loss"] for h in metrics["history"])
    model = ClapModel.from_pretrained(tmp_path / "run" / "final")
    scale, bias = model.logit_scale()
    assert scale.dim() == 0 and bias.dim() == 0
    # the shipped init (1/0.07 = 14.3) is above max_scale=12: the clamp of max_scale holds it at 12
    assert scale.item() == pytest.approx(12.0, rel=1e-4)
    assert metrics["history"][-1]["temperature"] == pytest.approx(1 / 12.0, rel=1e-4)


@pytest.mark.slow  # see test_siglip_trains_under_deepspeed
def test_per_modality_temperatures_are_both_logged(ray_local, shards, tmp_path, capfd):
    metrics = run(shards, tmp_path / "run", ["deepspeed.zero_stage=2", "model.temperature.per_modality=true",
                                             "train.lr=0.05"])
    last = metrics["history"][-1]
    assert {"temperature", "temperature_text"} <= set(last)
    model = ClapModel.from_pretrained(tmp_path / "run" / "final")
    scale_audio, scale_text = model.logit_scales()
    assert last["temperature"] == pytest.approx(1 / scale_audio.item(), rel=1e-5)
    assert last["temperature_text"] == pytest.approx(1 / scale_text.item(), rel=1e-5)
    assert last["temperature"] != last["temperature_text"]  # the two directions learned apart


def test_siglip_rejects_per_modality_temperature():
    with pytest.raises(ConfigError, match="per_modality.*infonce"):
        get_model_config("tiny", ["loss=siglip", "temperature.per_modality=true"])


# slow tier, for CI's budget (a Ray Train run): CI checks the policy's decisions themselves
# (tests/unit/pipelines/test_pretrain_failure_policy.py)
@pytest.mark.slow
def test_deterministic_setup_error_is_not_retried(ray_local, shards, tmp_path):
    # an optimizer setting DeepSpeed rejects at initialize: the same on every try
    start = time.monotonic()
    with pytest.raises(ray.train.TrainingFailedError) as failure:
        cfg = load_pretrain_config(DEFAULT_CONFIG, FAST + ["scaling.num_workers=1", "scaling.max_failures=3",
                                                           "train.betas=[0.9, 1.5]"])
        pretrain(str(shards), str(tmp_path / "run"), "tiny", cfg)
    errors = list(failure.value.worker_failures.values())
    assert errors and any(isinstance(e, SetupError) for e in errors)
    assert "betas" in str(failure.value) or "beta" in str(failure.value)
    assert time.monotonic() - start < 120
