"""Resume / --export-only load DeepSpeed checkpoints without running code from the run folder.

One DeepSpeed engine (tiny model, ZeRO-1, CPU, a one-process gloo group) saves a checkpoint; it loads back
bit-identical through `load_deepspeed_checkpoint`, and the same folder with a booby-trapped file (a pickle
that would create a marker file) is refused with a clear error while the marker never appears.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from clap_core.model.clap import ClapModel
from clap_core.train.config import load_pretrain_config, resolve_model_config
from clap_core.train.engine import TrainState, consolidated_state_dict, init_engine, read_checkpoint, write_checkpoint
from clap_core.train.safe_load import UntrustedCheckpointError, load_deepspeed_checkpoint, load_weights_only
from pipelines.job_configs import default_config_path

TAG = "deepspeed"


class Trap:
    """Unpickling this runs `touch <marker>` (what a tampered checkpoint on shared storage could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


def make_engine(zero_stage: int):
    cfg = load_pretrain_config(default_config_path("pretrain"), [f"deepspeed.zero_stage={zero_stage}", "train.batch_size=2"])
    torch.manual_seed(0)
    return init_engine(ClapModel(resolve_model_config("tiny", cfg.model)), cfg, use_gpu=False)


@pytest.fixture(scope="module")
def engine(group):
    return make_engine(1)


def params(engine) -> dict[str, torch.Tensor]:
    """Full weights (ZeRO-3 gathers its partitions)."""
    return consolidated_state_dict(engine)


def zero_weights(engine) -> None:
    import deepspeed

    weights = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(weights, modifier_rank=0, enabled=engine.zero_optimization_stage() == 3):
        with torch.no_grad():
            for p in weights:
                p.zero_()


@pytest.mark.parametrize("zero_stage", [1, 3])  # ZeRO-3 partitions the model states: other files, same allow-list
def test_checkpoint_round_trip_without_unpickling_code(group, zero_stage, tmp_path):
    engine = make_engine(zero_stage)
    engine.save_checkpoint(str(tmp_path), tag=TAG)
    saved = params(engine)
    zero_weights(engine)
    assert not torch.equal(params(engine)["audio_projection.linear1.weight"], saved["audio_projection.linear1.weight"])
    assert load_deepspeed_checkpoint(engine, str(tmp_path), TAG)
    restored = params(engine)
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    files = sorted(p.name for p in (tmp_path / TAG).iterdir())
    assert files == (["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"] if zero_stage < 3
                     else ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_booby_trapped_checkpoint_is_refused(engine, tmp_path, victim):
    folder = tmp_path / "run"
    engine.save_checkpoint(str(folder), tag=TAG)
    target = folder / TAG / victim
    state = torch.load(target, weights_only=False)  # our own file: trusted here, to tamper with it
    marker = tmp_path / "pwned"
    state["payload"] = Trap(marker)
    torch.save(state, target)

    with pytest.raises(UntrustedCheckpointError) as err:
        load_deepspeed_checkpoint(engine, str(folder), TAG)
    assert str(target) in str(err.value) and "Unsupported global" in str(err.value)
    assert not marker.exists()

    # the trap is real: DeepSpeed's own loader (full unpickling) would have run it
    shutil.copy(target, tmp_path / "copy.pt")
    torch.load(tmp_path / "copy.pt", weights_only=False)
    assert marker.exists()


def test_plain_weights_only_load_refuses_unknown_classes(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": Trap(marker)}, tmp_path / "x.pt")
    with pytest.raises(UntrustedCheckpointError, match="refused to load"):
        load_weights_only(str(tmp_path / "x.pt"))
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_weights_only(str(tmp_path / "ok.pt"))["w"], torch.ones(2))


def test_checkpoint_folder_keeps_train_state_json_as_before(engine, tmp_path):
    """train_state.json keeps its keys and order (runs resume across versions); a read records the resume."""
    state = TrainState(step=7, history=[{"step": 5, "loss": 3.5}], evals=[{"step": 7, "t2a/R@1": 0.25}], resumes=[3])
    write_checkpoint(engine, tmp_path, state, rank=0)
    legacy = {"step": 7, "epoch": 0, "history": [{"step": 5, "loss": 3.5}], "evals": [{"step": 7, "t2a/R@1": 0.25}],
              "resumes": [3]}
    assert (tmp_path / "train_state.json").read_text() == json.dumps(legacy)
    assert (tmp_path / TAG).is_dir()
    restored = read_checkpoint(engine, tmp_path)
    assert restored == TrainState(step=7, history=state.history, evals=state.evals, resumes=[3, 7])
    write_checkpoint(engine, tmp_path / "other_rank", state, rank=1)  # only rank 0 writes the state
    assert not (tmp_path / "other_rank" / "train_state.json").exists()
