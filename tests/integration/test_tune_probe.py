"""`clap tune-probe` end to end on a tiny MELD corpus of real mp4 files: the sweep, and an interrupted sweep resumed.

The corpus has ~8 clips per emotion and split (neutral twice as many, one corrupt mp4); the checkpoint is a
randomly initialised `tiny` CLAP, which still separates the emotions (distinct pitch, pulse rate and loudness;
cue words in the utterances).
"""
import json
import os
import signal

import pyarrow.parquet as pq
import pytest
import torch
from ray.tune import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clap_core import storage
from clap_core.data.meld import EMOTIONS
from clap_core.eval.probe import evaluate_probe, load_embeddings, load_probe
from clap_core.eval.probe_config import load_probe_sweep_config
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_demo.synth_meld import write_meld
from pipelines import cli, tune_probe
from pipelines.job_configs import default_config_path

pytestmark = pytest.mark.integration
SWEEP = ["tune.num_samples=4", "tune.max_concurrent_trials=2", "tune.grace_period=2", "search.epochs=[3,8]",
         "search.batch_size=[8,16]", "search.hidden=[[64,32],[128]]", "probe.hidden=[64,32]", "probe.batch_size=16",
         "probe.epochs=6", "embed.concurrency=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    ClapModel(get_model_config("tiny")).save_pretrained(path)
    return str(path)


def command(meld, checkpoint, output, *extra):
    return ["tune-probe", "--meld", str(meld), "--checkpoint", checkpoint, "--output", output, *SWEEP, *extra]


def trial_folders(experiment):
    names = {f[len(experiment) + 1:].split("/")[0] for f in storage.list_files(experiment)}
    return sorted(n for n in names if n.startswith("trial_"))


def test_sweep_beats_the_majority_baseline_on_test(ray_local, checkpoint, tmp_path, capsys):
    written = write_meld(tmp_path / "MELD.Raw", "raw")
    out = tmp_path / "sweep"
    assert cli.main(command(tmp_path / "MELD.Raw", checkpoint, str(out))) == 0
    summary = json.loads((out / "summary.json").read_text())
    console = capsys.readouterr()
    assert summary == json.loads(console.out.strip().splitlines()[-1])
    # the console: one bar over the trials, none of Tune's tables (they would print on stdout); the log has the rest
    assert "Trial status" not in console.out + console.err and "completed after" not in console.out + console.err
    assert "Configuration for experiment" not in console.out and len(console.out.strip().splitlines()) == 1
    assert "trials: 100%" in console.err and "4/4" in console.err and "best best_val_weighted_f1=" in console.err
    assert "Configuration for experiment" in (out / "logs" / "clap-tune-probe.log").read_text()
    # the acceptance criterion
    assert summary["test"]["probe"]["weighted_f1"] > summary["test"]["majority_baseline"]["weighted_f1"]
    # every CSV line is an embedded clip or a counted reject with its reason
    n_clips = sum(len(rows) for rows in written.values())
    assert summary["embeddings"] == {"rows": n_clips - 1, "rejects": 1, "reject_reasons": {"undecodable": 1}}
    rejects = [r for f in (out / "embeddings" / "_rejects").glob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert [(r["id"], r["stage"], r["reason"]) for r in rejects] == [("test/dia999_utt0", "decode", "undecodable")]
    # the exported best probe reproduces the reported test metrics
    model, cfg, classes = load_probe(str(out / "best"))
    data = load_embeddings(str(out / "embeddings"), EMOTIONS)
    test_metrics = json.loads((out / "best" / "test_metrics.json").read_text())
    assert evaluate_probe(model, data["test"], cfg.mode, classes) == test_metrics["probe"]
    best = json.loads((out / "best" / "config.json").read_text())
    assert set(best["params"]) == {"lr", "weight_decay", "dropout", "hidden", "batch_size", "class_weights", "epochs"}
    assert (out / "best" / "confusion_test.png").read_bytes()[:4] == b"\x89PNG"
    # results table: every trial, sorted by dev weighted F1, beside the baseline
    table = (out / "results.md").read_text()
    trial_lines = [line for line in table.splitlines() if line.startswith("| ") and line.split("|")[2].strip() in
                   ("complete", "early stop", "ASHA stop", "error")]
    assert len(trial_lines) == 4 and "majority baseline (`neutral`)" in table
    scores = [float(line.split("|")[4]) for line in trial_lines]
    assert scores == sorted(scores, reverse=True)
    # one TensorBoard run per trial, with the probe's curves
    folders = trial_folders(str(out / "meld_probe"))
    assert len(folders) == 4
    for folder in folders:
        events = EventAccumulator(str(out / "meld_probe" / folder)).Reload()
        assert {"val/weighted_f1", "train/loss", "val_f1/neutral"} <= set(events.Tags()["scalars"])


ARMED = {"interrupt": False}


class CtrlCMidTrial(Callback):
    """Presses Ctrl-C once a trial has finished and another has just checkpointed an epoch short of its last.

    Only while ARMED: the restored sweep unpickles this callback too.
    """

    def __init__(self):
        self.completed = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed += 1

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if ARMED["interrupt"] and self.completed and trial.last_result["epoch"] < trial.config["epochs"] - 1:
            ARMED["interrupt"] = False
            os.kill(os.getpid(), signal.SIGINT)  # Tune's handler: stop, save the experiment state


@pytest.mark.slow  # ~1 min: two sweeps on S3; CI keeps the local sweep, the speech-tower sweep and the resume unit tests
def test_interrupted_sweep_resumes_on_s3(ray_local, checkpoint, tmp_path, s3_bucket, monkeypatch, capsys):
    write_meld(tmp_path / "corpus", "reorganised", {"train": 6, "dev": 4, "test": 4}, corrupt=False, seed=1)
    out = f"s3://{s3_bucket}/sweeps/meld"
    cfg = load_probe_sweep_config(default_config_path("tune_probe"), SWEEP)  # what the command line loads
    ARMED["interrupt"] = True
    first = tune_probe.tune_probe(str(tmp_path / "corpus"), checkpoint, out, cfg, callbacks=(CtrlCMidTrial(),))
    assert first["status"] == "interrupted" and 1 <= first["trials_done"] < 4
    experiment = f"{out}/meld_probe"
    before = {t: storage.read_bytes(f"{experiment}/{t}/result.json") for t in trial_folders(experiment)}

    def embed_again(*a, **k):
        raise AssertionError("the embedding cache should have been reused")

    monkeypatch.setattr("pipelines.embed.embed_manifest", embed_again)
    capsys.readouterr()
    assert cli.main(command(tmp_path / "corpus", checkpoint, out)) == 0  # the same command again
    console = capsys.readouterr()
    assert "resuming the sweep" in console.err
    # the restored Tuner ran with this run's console settings, not the pickled ones (Tune's tables on stdout)
    assert "Trial status" not in console.out and "trials: 100%" in console.err and "4/4" in console.err
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert summary["trials"] == 4
    after = {t: storage.read_bytes(f"{experiment}/{t}/result.json") for t in trial_folders(experiment)}
    assert len(after) == 4 and set(before) <= set(after)
    for trial, data in after.items():
        results = [json.loads(line) for line in data.decode().splitlines()]
        # a resumed trial continued from its checkpoint: its epochs go on where they stopped, none repeated
        assert [r["epoch"] for r in results] == list(range(1, len(results) + 1)), trial
        assert data.startswith(before.get(trial, b"")), trial
    assert any(after[t] != before[t] for t in before)  # at least one trial was cut mid-way and finished later


def test_speech_tower_sweep_chooses_among_its_layers(ray_local, tmp_path, capsys):
    """A tiny wav2vec 2.0 checkpoint: `clap embed` also writes every pooled tower layer, the sweep varies the
    audio features (CLAP embedding, last layer, weighted layers) and the exported probe reproduces its test."""
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    ClapModel(get_model_config("tiny-wav2vec2")).save_pretrained(ckpt)
    write_meld(tmp_path / "corpus", "reorganised", {"train": 6, "dev": 4, "test": 4}, corrupt=False, seed=2)
    out = tmp_path / "sweep"
    args = command(tmp_path / "corpus", str(ckpt), str(out), "tune.num_samples=3", "search.epochs=[2,4]",
                   "probe.epochs=3", "probe.audio_features=weighted")
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = load_embeddings(str(out / "embeddings"), EMOTIONS)
    assert data["train"].audio_layers.shape[1:] == (3, 32)  # input + 2 layers of the tiny tower, 32 wide
    best = json.loads((out / "best" / "config.json").read_text())
    assert best["params"]["audio_features"] in ("embedding", "last", "weighted")
    assert summary["best"]["params"] == best["params"]
    model, cfg, classes = load_probe(str(out / "best"))
    assert cfg.audio_features == best["params"]["audio_features"]
    assert (model.layer_weights is not None) == (cfg.audio_features == "weighted")
    test_metrics = json.loads((out / "best" / "test_metrics.json").read_text())
    assert evaluate_probe(model, data["test"], cfg.mode, classes, cfg.audio_features) == test_metrics["probe"]
