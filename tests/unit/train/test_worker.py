"""The Ray-free parts of a pretraining worker (clap_core.train: validation, run_log, worker) without Ray.

Ray Train runs them for real in tests/integration/test_pretrain*.py; here each is checked on its own, fast.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clap_core.model.clap import ClapModel
from clap_core.train import validation
from clap_core.train.config import load_pretrain_config, resolve_model_config
from clap_core.train.engine import TrainState
from clap_core.train.run_log import RunLogger, StepWindow, duration, step_line
from clap_core.train.validation import ValidSet, gather_rows, rank_rows
from clap_core.train.worker import WorkerContext, log_interval
from tests.fixtures.shards import shard_row, tone


@pytest.mark.parametrize("n,world", [(7, 3), (6, 3), (1, 2), (5, 1)])
def test_rank_shards_gather_back_to_row_order(monkeypatch, n, world):
    """Each rank embeds rows rank, rank+W, ... (padded to equal counts); the all-gather restores row order."""
    rows = [rank_rows(n, r, world) for r in range(world)]
    assert len({len(r) for r in rows}) == 1  # every rank runs the same number of forwards
    assert set(np.concatenate(rows)) == set(range(n))
    embeds = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([[1.0, -1.0]])  # (n, 2): row i = (i, -i)
    per_rank = [embeds[torch.from_numpy(r)] for r in rows]

    def all_gather(parts, local):  # what torch.distributed.all_gather fills in on every rank
        for part, shard in zip(parts, per_rank):
            part.copy_(shard)

    monkeypatch.setattr(validation.dist, "all_gather", all_gather)
    for r in range(world):
        torch.testing.assert_close(gather_rows(per_rank[r], n, world), embeds)


def numpy_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows as a Ray Data numpy batch: one object array per column."""
    return {k: np.array([row[k] for row in rows] + [None], dtype=object)[:-1] for k in rows[0]}


@pytest.fixture(scope="module")
def tiny_cfg():
    return resolve_model_config("tiny", {})


def test_valid_set_keeps_source_clips_and_all_their_captions(tiny_cfg):
    clips = [shard_row(f"c{i}", tone(220.0 * (i + 1), 1.0), f"main {i}", "x", "valid") for i in range(3)]
    augmented = shard_row("c0#aug1", tone(220.0, 1.0), "main 0", "x", "valid")
    broken = shard_row("bad", np.zeros(10, np.float32), "broken", "x", "valid", audio=b"not flac")
    clips[1]["captions"] = []  # no caption list: the main caption stands alone
    batches = [numpy_batch([clips[0], augmented]), numpy_batch([broken, clips[1], clips[2]])]

    valid = ValidSet(iter(batches), tiny_cfg, limit=10)
    assert len(valid) == 3 and valid.waves.shape[0] == 3 and valid.lengths.tolist() == [48_000] * 3
    assert valid.texts == ["main 0", "x, recorded", "main 1", "main 2", "x, recorded"]
    assert valid.text_to_audio.tolist() == [0, 0, 1, 2, 2]
    assert valid.main_caption_rows.tolist() == [0, 2, 3]
    assert valid.tokens["input_ids"].shape[0] == 5
    assert len(ValidSet(iter(batches), tiny_cfg, limit=2)) == 1  # the first 2 source rows, one of them broken


def test_log_interval_and_run_summary(tiny_cfg, tmp_path, capfd):
    """One console line, TensorBoard points and a history entry per interval; metrics.json and curves.png."""
    cfg = load_pretrain_config(None, ["train.batch_size=4", "train.steps=20"])
    model = ClapModel(tiny_cfg)
    state = TrainState(step=10, history=[{"step": 5, "loss": 4.0}], resumes=[5])
    logger = RunLogger(str(tmp_path), state, enabled=True)
    engine = SimpleNamespace(module=model, get_lr=lambda: [1e-3])
    ctx = WorkerContext(cfg, tiny_cfg, engine, torch.nn.Identity(), state, logger, None, 0, 1, torch.device("cpu"),
                        str(tmp_path))
    window = StepWindow()
    window.add(3.0, 0.0)
    window.add(2.0, 0.5)
    window.seconds = 2.0  # two steps of one second each, half a second of it spent waiting for data

    metrics = log_interval(ctx, window)
    assert metrics == {"train/loss": 2.5, "train/temperature": pytest.approx(0.07), "train/lr": 1e-3,
                       "train/samples_per_s": 4.0, "train/data_wait_share": 0.25}
    # ETA at this interval's pace: 10 steps left at 1 s each
    assert state.history[-1] == {"step": 10, **{k.removeprefix("train/"): v for k, v in metrics.items()}, "eta_s": 10.0}
    assert "step 10/20  loss 2.5000  temperature 0.0700  lr 1.00e-03  4.0 samples/s  data-wait 25%  ETA 10s\n" \
        in capfd.readouterr().out
    assert [duration(s) for s in (42.4, 320, 7500)] == ["42s", "5m20s", "2h05m"]
    assert "ETA" not in step_line({**state.history[-1], "step": 20}, 20)  # the last line has none
    logger.evaluation(10, {"val/t2a/R@1": 0.5, "val/t2a/R@5": 1.0, "val/a2t/R@1": 0.25, "val/t2a/mAP@10": 0.6})
    assert state.evals == [{"step": 10, "t2a/R@1": 0.5, "t2a/R@5": 1.0, "a2t/R@1": 0.25, "t2a/mAP@10": 0.6}]
    logger.sync()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    assert logger.write_summary(tmp_path, state, "abc") == ["metrics.json", "curves.png"]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary == {"step": 10, "config_hash": "abc", "resumes": [5], "history": state.history,
                       "evals": state.evals, "final_eval": state.evals[-1]}
    assert (tmp_path / "curves.png").stat().st_size > 0
